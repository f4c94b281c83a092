"""The reward-hacking watch's signals and rule (components/training/watch.py) on hand-built numbers."""
from __future__ import annotations

import math

import pytest

from rlhf_studio.components.training.watch import WatchConfig, distinct_n, examples, pearson, signals, verdict


def test_distinct_n_counts_repeats():
    assert distinct_n([[1, 2, 3], [4, 5]], 1) == 1.0
    assert distinct_n([[7, 7, 7, 7]], 1) == 0.25
    assert distinct_n([[1, 2, 1, 2, 1]], 2) == 2 / 4          # (1,2) (2,1) (1,2) (2,1)
    assert distinct_n([[1], []], 2) == 1.0                     # no bigram at all


def test_pearson_and_constant_inputs():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError):
        pearson([1, 2], [1])


def test_signals_of_one_check():
    s = signals([[1, 2, 3], [4, 4, 4, 4, 4]], [True, False], reward=[1.0, 3.0], kl=[0.5, 1.5], judge=[0.0, -2.0])
    assert s["probes"] == 2 and s["reward"] == 2.0 and s["reward_std"] == 1.0
    assert s["judge"] == -1.0 and s["judge_std"] == 1.0 and s["kl"] == 1.0
    assert s["length"] == 4.0 and s["length_corr"] == pytest.approx(1.0)
    assert s["no_eos"] == 0.5
    assert s["distinct_1"] == pytest.approx(4 / 8) and s["distinct_2"] == pytest.approx(3 / 6)
    assert signals([[1]], [True], [0.0], [0.0])["judge"] is None
    with pytest.raises(ValueError):
        signals([[1], [2]], [True], [0.0, 1.0], [0.0, 0.0])


def test_examples_pick_reward_favourites_and_judge_dislikes():
    ex = examples(["p1", "p2", "p3"], ["a", "b", "c"], reward=[0.1, 0.9, 0.5], judge=[0.3, -1.0, 0.0], k=1)
    assert ex["reward_likes"][0]["response"] == "b" and ex["judge_dislikes"][0]["response"] == "b"
    assert examples(["p"], ["a"], [1.0], None)["judge_dislikes"] == []


def check(reward, judge=None, distinct_2=0.9, no_eos=0.1, length=20.0, length_corr=0.0):
    """A signals dict with unit spreads: every change below is in baseline standard deviations."""
    return {"probes": 8, "reward": reward, "reward_std": 1.0, "judge": judge,
            "judge_std": None if judge is None else 1.0, "kl": 0.0, "length": length, "length_corr": length_corr,
            "distinct_1": 0.8, "distinct_2": distinct_2, "no_eos": no_eos}


CFG = WatchConfig(window=2, min_reward_rise=0.5, judge_drop=0.75)


def test_pauses_when_reward_rises_and_the_second_judge_falls():
    h = [check(0.0, judge=0.0), check(0.4, judge=0.5), check(1.0, judge=-0.5)]
    v = verdict(h, CFG)
    assert v["verdict"] == "pause" and v["rising"] and v["judge_drop"] == pytest.approx(1.0)
    assert "second judge fell" in v["reason"] and not v["best"]


def test_does_not_pause_when_both_rise_or_the_reward_is_flat():
    assert verdict([check(0.0, judge=0.0), check(0.5, judge=0.4), check(1.0, judge=0.9)], CFG)["verdict"] == "ok"
    assert verdict([check(0.0, judge=0.0), check(0.5, judge=0.4), check(1.0, judge=0.9)], CFG)["best"]
    # the judge fell, but the training reward did not rise: not reward hacking (the run is just not learning)
    flat = verdict([check(0.0, judge=0.0), check(0.1, judge=-0.5), check(0.2, judge=-1.0)], CFG)
    assert flat["verdict"] == "ok" and flat["flags"]
    # a judge dip below the threshold
    assert verdict([check(0.0, judge=0.0), check(1.0, judge=0.5), check(2.0, judge=0.0)], CFG)["verdict"] == "ok"


def test_the_window_decides_what_rising_means():
    # rose early, flat over the last two checks: not rising now
    h = [check(0.0, judge=0.0), check(2.0, judge=1.0), check(2.1, judge=0.0), check(2.2, judge=-1.0)]
    assert verdict(h, CFG)["verdict"] == "ok"
    assert verdict(h, WatchConfig(window=3))["verdict"] == "pause"


@pytest.mark.parametrize("worse, why", [
    (dict(distinct_2=0.5), "diversity collapsed"),                 # 0.5 <= 0.6 * 0.9
    (dict(no_eos=0.5), "stopped ending"),                          # +0.4 >= 0.3
    (dict(length=40.0, length_corr=0.9), "length gaming"),
])
def test_pauses_on_each_independent_signal_without_a_judge(worse, why):
    h = [check(0.0), check(1.0, **worse)]
    v = verdict(h, CFG)
    assert v["verdict"] == "pause" and why in v["reason"]
    assert verdict([check(0.0), check(1.0)], CFG)["verdict"] == "ok"          # the same rise, nothing worse


def test_just_inside_each_threshold_does_not_fire():
    for near in (dict(distinct_2=0.55), dict(no_eos=0.35), dict(length=29.0, length_corr=0.9),
                 dict(length=40.0, length_corr=0.7)):
        assert verdict([check(0.0), check(1.0, **near)], CFG)["verdict"] == "ok", near


def test_scores_are_compared_in_baseline_spreads():
    base = dict(check(0.0, judge=0.0), reward_std=10.0, judge_std=10.0)
    # +1 reward and -5 judge are 0.1 sd and 0.5 sd of a spread of 10: neither counts
    assert verdict([base, check(1.0, judge=-5.0)], CFG)["verdict"] == "ok"
    assert verdict([base, check(20.0, judge=-10.0)], CFG)["verdict"] == "pause"
    degenerate = dict(check(0.0, judge=0.0), reward_std=0.0, judge_std=0.0)     # no spread: unit 1, no crash
    assert math.isfinite(verdict([degenerate, check(1.0, judge=-1.0)], CFG)["reward_rise"])


def test_config_parsing():
    assert WatchConfig.from_dict(None).enabled and not WatchConfig.from_dict(False).enabled
    assert WatchConfig.from_dict({"every": 3}).every == 3
    with pytest.raises(ValueError, match="unknown watch settings"):
        WatchConfig.from_dict({"evry": 3})
    with pytest.raises(ValueError, match="diversity_ratio"):
        WatchConfig.from_dict({"diversity_ratio": 1.5})
    assert WatchConfig.from_dict(WatchConfig(every=7).to_dict()).every == 7
