"""Child process of the kill -9 during reward-model training case: `Studio(db)` as the app opens it.

1. Labels (rankings of 3 completions for 5 prompts), then one complete deep-tier update:   V1 <version id> <pairs>
2. More labels (3 prompts), then a long deep update in the background (as the app's auto-update runs it);
   once its run row says 'running':                                                         TRAINING <run id> <feedback rows>
Then it waits to be killed.
"""
import sys
import time

from rlhf_studio import Studio

SMALL = dict(lora_layers=1, epochs=1, batch_size=4, micro_batch_size=2, max_tokens=64)


def rank_prompts(s: Studio, prompts) -> None:
    for p in prompts:
        cs = s.generate(p, n=3, max_new_tokens=6, seed=0)
        s.rank([c.id for c in cs])


def main() -> None:
    s = Studio(sys.argv[1])
    s.reward.settings.deep_every = 0
    rank_prompts(s, ["Name a fruit.", "Say hello.", "Name a colour.", "Name a tree.", "Name a river."])
    v1 = s.train_reward_model(tier="deep", **SMALL)
    print("V1", v1, len(s.reward.pairs()), flush=True)
    rank_prompts(s, ["Name a bird.", "Name a city.", "Name a song."])
    s.train_reward_model(tier="deep", wait=False, **{**SMALL, "epochs": 500})
    while True:
        runs = s.runs()
        running = runs[(runs["kind"] == "reward") & (runs["status"] == "running")]
        if len(running):
            print("TRAINING", int(running["id"].iloc[-1]), s.store.stats()["feedback"], flush=True)
            break
        time.sleep(0.2)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
