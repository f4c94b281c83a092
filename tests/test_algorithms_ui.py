"""The Train tab's algorithm picker, as plain functions: which settings show, how they map to each config,
which curves a run draws; and the tab builds with it."""
import pandas as pd
import pytest

from rlhf_studio.studio.ui import algorithms


def test_each_algorithm_shows_only_its_settings():
    ppo_row, ppo_launch, tier, launch, *groups = algorithms.on_algorithm("dpo")
    assert ppo_row["visible"] is False and ppo_launch["visible"] is False and tier["visible"] is False
    assert launch["visible"] is True and launch["value"] == "Launch DPO"
    assert [g["visible"] for g in groups] == [a == "dpo" for a in algorithms.FIELDS]
    ppo_row, _, tier, launch, *groups = algorithms.on_algorithm("ppo")
    assert ppo_row["visible"] and tier["visible"] and not launch["visible"] and not any(g["visible"] for g in groups)
    assert algorithms.on_algorithm("grpo")[2]["visible"] is True       # online: the reward tier applies


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "dpo", "kto"])
def test_ui_values_become_a_valid_config(algorithm):
    from rlhf_studio.components.training import config_class
    fields = algorithms.FIELDS[algorithm]
    values = [d[0] if kind is list else d for _, _, d, kind in fields]
    cfg = config_class(algorithm)(**algorithms.settings(algorithm, values))
    assert cfg.lora_alpha == 2 * cfg.lora_r
    with pytest.raises(ValueError, match="fill in Steps"):
        algorithms.settings(algorithm, [None] + values[1:])


def test_dpo_run_draws_its_own_curves():
    m = pd.DataFrame({"step": [1, 2], "loss": [0.69, 0.6], "reward_margin": [0.0, 0.2], "logp_chosen": [-9, -8],
                      "logp_rejected": [-9, -10]})
    fig = algorithms.curves(m, "dpo")
    titles = [a.text for a in fig.layout.annotations]
    assert "reward margin (chosen - rejected)" in titles and "log-prob rejected" in titles
    assert fig.layout.title.text == "DPO training"
    assert algorithms.curves(m, "ppo").layout.title.text == "PPO training"


def test_train_tab_builds_with_the_picker(studio):
    from rlhf_studio.studio.app import build_app
    demo = build_app(studio)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"train-algorithm", "algorithm-launch", "dpo-beta", "grpo-k", "kto-desirable-weight"} <= ids
    md = algorithms.memory_md(studio, "grpo", [d for _, _, d, _ in algorithms.FIELDS["grpo"]])
    assert "Estimated memory for this run" in md
    assert "fill in" in algorithms.on_launch(studio, "dpo", "fast", None, [None] * 9)
    assert "needs preference pairs" in algorithms.on_launch(
        studio, "dpo", "fast", None, [d[0] if k is list else d for _, _, d, k in algorithms.FIELDS["dpo"]])
