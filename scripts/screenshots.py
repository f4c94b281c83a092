"""Remake the README's screenshots from a real session on the embedded model (~5 minutes on a 2-core CPU).

Builds a fresh database the way a user would: generates completions for a dozen everyday prompts and labels
them (rankings, stars, thumbs), fits the fast reward model, runs a short PPO job on it; then starts the app on
that database (`launch.py`), generates once more in the Generate & Rate tab, and photographs each tab in
headless Chromium. Needs the test tools (`make test` installs playwright and Debian's chromium).

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--ppo-steps 12]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_ppo import PROMPTS as BENCH_PROMPTS  # noqa: E402

PROMPTS = BENCH_PROMPTS[:12]        # everyday prompts, the CPU PPO bench's


def build(db: str, ppo_steps: int) -> None:
    from rlhf_studio import Studio
    s = Studio(db)
    try:
        s.reward.settings.deep_every = 0
        for i, prompt in enumerate(PROMPTS):
            cs = s.generate(prompt, n=4, max_new_tokens=40, seed=i)
            # a stand-in preference, the same for every prompt: shorter answers first
            s.rank([c.id for c in sorted(cs, key=lambda c: len(c.text))])
            s.rate(cs[0].id, 1 + i % 5)
            s.thumbs(cs[1].id, up=i % 2 == 0, tags=[] if i % 2 == 0 else ["unhelpful"])
        s.train_reward_model(tier="fast", wait=True)
        s.train_ppo(steps=ppo_steps, wait=True, reward_tier="fast", prompts=PROMPTS, batch_size=4,
                    mini_batch_size=4, max_new_tokens=24, ppo_epochs=2)
    finally:
        s.close()


def photograph(db: str, out: Path) -> list[Path]:
    from playwright.sync_api import expect

    from tests.browser import browser, generate_in_page, running_app
    shots = []
    with running_app(db) as (url, _), browser() as b:
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        generate_in_page(page, "Give me three ideas for a rainy afternoon.", max_new_tokens=48, seed=3)
        expect(page.locator("#status")).to_contain_text("4 completions saved", timeout=180_000)
        page.locator("#stars-0 input[value='4']").click()
        expect(page.locator("#status")).to_contain_text("4 stars for A", timeout=60_000)
        for tab, name in [("Generate & Rate", "generate-and-rate"), ("Reward model", "reward-model"),
                          ("Train (PPO)", "train-ppo"), ("Dashboard", "dashboard")]:
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(5000)             # the tab's tables and plots load on selection
            path = out / f"{name}.png"
            page.screenshot(path=str(path), full_page=True)
            shots.append(path)
    return shots


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    ap.add_argument("--ppo-steps", type=int, default=12)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="studio-shots-") as tmp:
        db = str(Path(tmp) / "session.duckdb")
        build(db, args.ppo_steps)
        for path in photograph(db, out):
            print(path)


if __name__ == "__main__":
    main()
