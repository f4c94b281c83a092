"""Bradley-Terry math, the fast tier on synthetic features, and the preference-file parsers (no model)."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_studio.components.reward.bt import bt_loss, expected_calibration_error, pairwise_accuracy, reliability_bins
from rlhf_studio.storage.io import FileFormatError as PreferenceFormatError
from rlhf_studio.storage.io.preferences import read_hh as parse_hh, read_trl as parse_trl
from rlhf_studio.components.reward.fast import DEFAULT_C, FastRewardModel

from tests.data_paths import HH_REAL


# ------------------------------------------------------------------------------------------ BT loss

def test_bt_loss_by_hand():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    plain = [math.log(1 + math.exp(-2)), math.log(2)]
    assert bt_loss(c, r, reduction="none").tolist() == pytest.approx(plain, abs=1e-6)
    assert float(bt_loss(c, r)) == pytest.approx(sum(plain) / 2, abs=1e-6)
    # margin [0, 1]: -log sigmoid(2 - 0 - 0) and -log sigmoid(0 - 0 - 1) = log(1 + e)
    m = torch.tensor([0.0, 1.0])
    with_margin = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(1))]
    assert bt_loss(c, r, m, reduction="none").tolist() == pytest.approx(with_margin, abs=1e-6)
    assert float(bt_loss(c, r, m, reduction="sum")) == pytest.approx(sum(with_margin), abs=1e-6)
    assert float(bt_loss(c, r, m)) == pytest.approx(0.7200948, abs=1e-6)


def test_bt_loss_stable_and_differentiable():
    c = torch.tensor([100.0, -100.0], requires_grad=True)
    loss = bt_loss(c, torch.zeros(2), reduction="none")
    assert torch.isfinite(loss).all()
    assert float(loss[0].detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(loss[1].detach()) == pytest.approx(100.0)
    loss.sum().backward()
    assert c.grad.tolist() == pytest.approx([0.0, -1.0], abs=1e-6)
    with pytest.raises(ValueError):
        bt_loss(c, c, reduction="max")


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy([1, 2, 3, 0], [0, 2, 5, -1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert math.isnan(pairwise_accuracy([], []))


def test_reliability_bins_and_ece_by_hand():
    p = [0.85, 0.85, 0.25]
    bins = {round(b.lo, 1): b for b in reliability_bins(p, 10)}
    # each pair counts as (p, won) and (1 - p, lost)
    assert sorted(bins) == [0.1, 0.2, 0.7, 0.8]
    assert bins[0.8].count == 2 and bins[0.8].observed == 1.0 and bins[0.8].mean_predicted == pytest.approx(0.85)
    assert bins[0.1].count == 2 and bins[0.1].observed == 0.0
    assert bins[0.2].count == 1 and bins[0.2].observed == 1.0
    assert bins[0.7].count == 1 and bins[0.7].observed == 0.0
    assert expected_calibration_error(p, 10) == pytest.approx((2 * 0.15 + 0.75 + 2 * 0.15 + 0.75) / 6)
    # explicit outcomes, and the edges land in the right bins
    b = reliability_bins([0.0, 1.0, 0.5], 2, outcomes=[0, 1, 1])
    assert [(x.count, x.observed) for x in b] == [(1, 0.0), (2, 1.0)]
    assert expected_calibration_error([0.5] * 10, 10) == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------ fast tier

def _synthetic(n, F, rng, w_true, scale=1.0):
    Xa, Xb = rng.normal(size=(n, F)), rng.normal(size=(n, F))
    logits = scale * (Xa - Xb) @ w_true
    a_wins = rng.random(n) < 1 / (1 + np.exp(-logits))
    Xc = np.where(a_wins[:, None], Xa, Xb).astype(np.float32)
    Xr = np.where(a_wins[:, None], Xb, Xa).astype(np.float32)
    return Xc, Xr


def test_fast_tier_recovers_direction():
    rng = np.random.default_rng(0)
    F = 64
    w_true = rng.normal(size=F)
    w_true /= np.linalg.norm(w_true)
    Xc, Xr = _synthetic(800, F, rng, w_true, scale=4.0)
    m = FastRewardModel().fit(Xc, Xr)
    assert m.cv is not None and m.l2 > 0
    Ta, Tb = rng.normal(size=(2000, F)), rng.normal(size=(2000, F))
    truth = (Ta - Tb) @ w_true > 0
    sa, _ = m.score(Ta)
    sb, _ = m.score(Tb)
    assert ((sa > sb) == truth).mean() > 0.9
    direction = m.weight / m.std
    assert direction @ w_true / np.linalg.norm(direction) > 0.9
    ev = m.evaluate(Xc, Xr)
    assert ev["n"] == 800 and 0.8 < ev["accuracy"] <= 1.0 and ev["loss"] < math.log(2)
    assert 0 <= ev["ece"] < 0.2 and sum(b["count"] for b in ev["bins"]) == 1600


def test_fast_tier_primal_path_and_warm_refit():
    rng = np.random.default_rng(1)
    F = 48
    w_true = rng.normal(size=F) / math.sqrt(F)
    Xc, Xr = _synthetic(300, F, rng, w_true, scale=3.0)     # n > F: primal Newton
    m = FastRewardModel().fit(Xc, Xr, l2=5.0)
    dual = FastRewardModel().fit(Xc[:30], Xr[:30], l2=5.0)   # n < F: dual
    assert m.n_pairs == 300 and dual.n_pairs == 30
    # the optimum: gradient of the penalised loss is ~0
    D = (Xc.astype(np.float64) - Xr.astype(np.float64)) / m.std
    p = 1 / (1 + np.exp(-(D @ m.weight)))
    grad = -(D.T @ (1 - p)) + 5.0 * m.weight
    assert np.abs(grad).max() < 1e-4        # objective converged to ~1e-12 relative
    w_before = m.weight.copy()
    m.fit(Xc, Xr, l2=5.0)                                      # warm start from itself: same answer
    assert np.allclose(m.weight, w_before, atol=1e-6)


def test_fast_tier_laplace_std_grows_away_from_data():
    rng = np.random.default_rng(2)
    F = 32
    w_true = rng.normal(size=F)
    Xc, Xr = _synthetic(200, F, rng, w_true / np.linalg.norm(w_true), scale=2.0)
    m = FastRewardModel().fit(Xc, Xr)
    d = rng.normal(size=F)
    d /= np.linalg.norm(d)
    pts = np.stack([m.mean + t * d * m.std for t in (0.0, 1.0, 3.0, 10.0)])
    _, std = m.score(pts)
    assert std[0] == pytest.approx(0.0, abs=1e-9)
    assert std[1] < std[2] < std[3]
    assert std[3] == pytest.approx(10 * std[1], rel=1e-3)        # linear in the distance from the mean
    p_ab, s_ab = m.prob_chosen(pts[1:], pts[:-1])
    p_ba, s_ba = m.prob_chosen(pts[:-1], pts[1:])
    assert np.allclose(p_ab + p_ba, 1.0) and np.allclose(s_ab, s_ba)
    assert np.all((p_ab > 0) & (p_ab < 1))


def test_fast_tier_few_pairs_margin_and_head():
    rng = np.random.default_rng(3)
    Xc, Xr = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    m = FastRewardModel().fit(Xc, Xr, margin=[0, 1, 2, 0, 1])
    assert m.cv is None and m.l2 == pytest.approx(DEFAULT_C * m.l2_scale)
    w, b, mean, std = m.to_torch_head()
    X = rng.normal(size=(7, 16))
    head = (((torch.tensor(X, dtype=torch.float32) - mean) / std) @ w + b).numpy()
    assert np.allclose(head, m.score(X)[0], atol=1e-4)
    ev = m.evaluate(Xc, Xr, margin=[0, 1, 2, 0, 1])
    assert ev["loss"] > m.evaluate(Xc, Xr)["loss"]          # a margin asks for more separation
    with pytest.raises(ValueError):
        m.fit(Xc, Xr[:4])
    with pytest.raises(ValueError):
        m.fit(Xc, np.full_like(Xr, np.nan))
    with pytest.raises(RuntimeError):
        FastRewardModel().score(X)


def test_fast_tier_bytes_round_trip():
    rng = np.random.default_rng(4)
    Xc, Xr = rng.normal(size=(40, 24)), rng.normal(size=(40, 24))
    m = FastRewardModel().fit(Xc, Xr)
    b = m.to_bytes()
    assert not b.startswith(b"\x80")                         # not a pickle
    m2 = FastRewardModel.from_bytes(b)
    X = rng.normal(size=(9, 24))
    for name in ("weight", "mean", "std"):        # the parameters come back bit for bit
        assert np.array_equal(getattr(m, name), getattr(m2, name)), name
    assert np.array_equal(m.cov.astype(np.float32), m2.cov) and m2.bias == m.bias
    # scores to rounding: BLAS may sum in another order for arrays at other addresses (seen on an AMD EPYC)
    for a1, a2 in zip(m.score(X), m2.score(X)):
        np.testing.assert_allclose(a1, a2, rtol=1e-6, atol=1e-12)
    assert m2.l2 == m.l2 and m2.n_pairs == 40 and m2.cv == m.cv
    with pytest.raises(ValueError):
        FastRewardModel.from_bytes(b"not safetensors at all")


def test_fast_tier_refit_time_is_small():
    rng = np.random.default_rng(5)
    Xc = rng.normal(size=(2000, 1152)).astype(np.float32)
    Xr = rng.normal(size=(2000, 1152)).astype(np.float32)
    m = FastRewardModel().fit(Xc, Xr)
    # generous bound: the machine running the tests may be shared; typically well under a second
    assert m.fit_seconds < 20.0


# ------------------------------------------------------------------------------------------ parsers

def _write_jsonl(path: Path, rows, gz=False):
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


HH_OK = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant: Why did the chicken...",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant: No."}


def test_parse_hh_small_files(tmp_path):
    rows = [HH_OK, "", {"chosen": "\n\nHuman: q\n\nAssistant:  a  ", "rejected": "\n\nHuman: q\n\nAssistant: b"}]
    for gz in (False, True):
        out = parse_hh(_write_jsonl(tmp_path / f"hh{gz}.jsonl{'.gz' if gz else ''}", rows, gz))
        assert out[0] == {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:",
                          "chosen": "Why did the chicken...", "rejected": "No."}
        assert out[1] == {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": "a", "rejected": "b"}
    # a response that itself contains "\n\nAssistant:" does not move the split
    tricky = {"chosen": "\n\nHuman: q\n\nAssistant: one\n\nAssistant: two",
              "rejected": "\n\nHuman: q\n\nAssistant: other"}
    out = parse_hh(_write_jsonl(tmp_path / "t.jsonl", [tricky]))
    assert out[0] == {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": "one\n\nAssistant: two", "rejected": "other"}


@pytest.mark.parametrize("bad,line,field", [
    ('{"chosen": "x", ', 3, None),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a"}, 3, "rejected"),
    ({"chosen": 5, "rejected": "\n\nHuman: q\n\nAssistant: b"}, 3, "chosen"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"}, 3, "rejected"),
    ([1, 2], 3, None),
])
def test_parse_hh_malformed_names_line(tmp_path, bad, line, field):
    path = _write_jsonl(tmp_path / "bad.jsonl", [HH_OK, HH_OK, bad, HH_OK])
    with pytest.raises(PreferenceFormatError) as e:
        parse_hh(path)
    assert f"line {line}" in str(e.value) and e.value.line == line
    assert isinstance(e.value, ValueError)
    if field:
        assert repr(field) in str(e.value) and e.value.field == field


def test_parse_trl_jsonl_and_parquet(tmp_path):
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "Q2"}],
         "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]},
        {"chosen": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "no"}]},
    ]
    expect = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant:", "chosen": "good", "rejected": "bad"},
        {"prompt": "Hey", "chosen": "yes", "rejected": "no"},
    ]
    assert parse_trl(_write_jsonl(tmp_path / "p.jsonl", rows)) == expect
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "s.parquet")      # plain strings
    assert parse_trl(tmp_path / "s.parquet") == expect[:1]
    pq.write_table(pa.Table.from_pylist(rows[1:3]), tmp_path / "c.parquet")     # conversational
    assert parse_trl(tmp_path / "c.parquet") == expect[1:3]


@pytest.mark.parametrize("bad,field", [
    ({"prompt": "p", "chosen": "c"}, "rejected"),
    ({"chosen": "c", "rejected": "r"}, "prompt"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": "r"}, "chosen"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "prompt"),
    ({"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": 7}]}, "rejected"),
])
def test_parse_trl_malformed_names_line_and_field(tmp_path, bad, field):
    ok = {"prompt": "p", "chosen": "c", "rejected": "r"}
    with pytest.raises(PreferenceFormatError) as e:
        parse_trl(_write_jsonl(tmp_path / "bad.jsonl", [ok, bad]))
    assert "line 2" in str(e.value) and repr(field) in str(e.value)
    with pytest.raises(PreferenceFormatError) as e:
        parse_trl(_write_jsonl(tmp_path / "bad2.jsonl", [ok, "not json"]))
    assert "line 2" in str(e.value)


def test_parse_trl_parquet_errors_name_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "c", "rejected": "r"},
                                         {"prompt": "p", "chosen": None, "rejected": "r"}]), tmp_path / "x.parquet")
    with pytest.raises(PreferenceFormatError) as e:
        parse_trl(tmp_path / "x.parquet")
    assert "row 2" in str(e.value) and "'chosen'" in str(e.value)
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "c"}]), tmp_path / "y.parquet")
    with pytest.raises(PreferenceFormatError, match="'rejected'"):
        parse_trl(tmp_path / "y.parquet")
    (tmp_path / "z.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(PreferenceFormatError):
        parse_trl(tmp_path / "z.parquet")


@pytest.mark.skipif(not HH_REAL.exists(), reason="HH-RLHF test file not present")
def test_parse_hh_real_file():
    pairs = parse_hh(HH_REAL)
    assert len(pairs) == 2312
    assert all(p["prompt"].endswith("\n\nAssistant:") and p["prompt"].startswith("\n\nHuman:") for p in pairs)
    assert all(isinstance(p["chosen"], str) and isinstance(p["rejected"], str) for p in pairs)
    assert sum(p["chosen"] != p["rejected"] for p in pairs) > 2200


def test_pool_features_by_hand_and_nan_at_padding_stays_out():
    from rlhf_studio.components.reward.features import pool_features
    h = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])     # [1, 4, 2]; position 0 is padding
    am = torch.tensor([[0, 1, 1, 1]])
    rm = torch.tensor([[0, 0, 1, 1]])
    want = torch.tensor([[5.0, 6.0, 4.0, 5.0]])                          # last real token ++ mean of the response
    assert torch.equal(pool_features(h, am, rm), want)
    h[0, 0] = float("nan")      # a padded position's state, as an attention kernel may leave a fully masked row
    assert torch.equal(pool_features(h, am, rm), want)
