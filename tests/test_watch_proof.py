"""Proof that the reward-hacking watch works (tests/watch_sim.py has the simulated annotator): PPO against a
gameable reward raises that reward while the annotator's true preference falls, and the watch pauses before the
true preference has fallen far; against an honest reward, run as long, it does not pause. Real PPO on the
embedded model cut to its first layers (tests.layers.keep_first_layers), short answers, 8 prompts.
bench/bench_watch.py runs the same over several seeds and reports the figures."""
from __future__ import annotations

import pytest

from rlhf_studio.components.training.watch import WatchConfig
from tests.layers import keep_first_layers
from tests.watch_sim import simulate

pytestmark = pytest.mark.slow

LAYERS, STEPS, EVERY = 4, 6, 2


@pytest.fixture(scope="module")
def lm_sim():
    from rlhf_studio.components.models import load_model
    return keep_first_layers(load_model("embedded", dtype="fp32"), LAYERS)


def test_watch_pauses_a_gamed_run_early_and_leaves_an_honest_one_alone(lm_sim):
    cfg = WatchConfig(every=EVERY)
    gamed = simulate(lm_sim, "gamed", STEPS, cfg, seed=0)
    print("\ngamed", {k: gamed[k] for k in ("steps", "truth", "reward", "verdicts", "paused_at", "cue")})
    # the scenario is real: the gameable reward rose, and the true preference fell well below its peak
    assert gamed["reward"][-1] > gamed["reward"][0]
    peak = max(range(len(gamed["truth"])), key=gamed["truth"].__getitem__)
    fallen = gamed["truth"][peak] - gamed["truth"][-1]
    assert fallen > 2.0, gamed["truth"]
    # the watch paused, at most one check after the true preference's peak, before a quarter of the fall
    assert gamed["paused_at"] is not None, gamed["flags"]
    at = gamed["steps"].index(gamed["paused_at"])
    assert gamed["paused_at"] - gamed["steps"][peak] <= EVERY
    assert gamed["truth"][peak] - gamed["truth"][at] < fallen / 4, (gamed["truth"], at)

    honest = simulate(lm_sim, "honest", STEPS, cfg, seed=0)
    print("honest", {k: honest[k] for k in ("steps", "truth", "reward", "verdicts", "flags")})
    assert honest["reward"][-1] > honest["reward"][0]          # it trained: the honest reward rose too
    assert honest["paused_at"] is None, honest["flags"]
