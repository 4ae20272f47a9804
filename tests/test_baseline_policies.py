"""Baseline index policies and per-participant budgets, against their definitions."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from flwr.app import ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from msfusion_flwr.config import MSFUSION_PAPER, RunConfig
from msfusion_flwr.engine import SplitSpec
from msfusion_flwr.engine.policies import (
    DoubleShift,
    FullWidth,
    OrderedDropout,
    PlanRequest,
    RandomSubset,
    RollingWindow,
    StaticPrefix,
)
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.models import build_model
from msfusion_flwr.protocol import CONFIG, PLAN, client_config, decode_plan
from msfusion_flwr.server.methods import POLICIES, global_widths, make_strategy
from msfusion_flwr.server.nodes import Budgets, NodeProfile

SETTINGS = settings(max_examples=150, deadline=None)
widths_st = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(1, 300), min_size=1)
ratio_st = st.floats(0.01, 1.0)


def request(widths, ratio, rank=0, m=1, t=1, pid=0, seed=0) -> PlanRequest:
    return PlanRequest(dict(widths), ratio, rank, m, t, pid, seed)


def ref_length(ratio: float, k: int) -> int:
    return max(1, round(ratio * k))


@SETTINGS
@given(widths=widths_st, ratio=ratio_st, t=st.integers(1, 50), pid=st.integers(0, 99))
def test_heterofl_holds_the_first_w_units_every_round(widths, ratio, t, pid):
    """HeteroFL: indices 0..w-1 of every group, whatever the round or participant; rate r."""
    a = StaticPrefix().assign(request(widths, ratio, t=t, pid=pid))
    assert a.rate == ratio
    for name, k in widths.items():
        assert a.plan[name].tolist() == list(range(ref_length(ratio, k)))


@SETTINGS
@given(widths=widths_st, ratio=ratio_st, t=st.integers(1, 400), m=st.integers(1, 12))
def test_fedrolex_window_starts_at_minus_round_and_is_shared(widths, ratio, t, m):
    """FedRolex: the window {s..s+w-1} mod K with s = -(t-1) mod K, identical for every rank."""
    plans = [RollingWindow().assign(request(widths, ratio, rank=j, m=m, t=t)).plan for j in range(m)]
    for name, k in widths.items():
        s, w = (-(t - 1)) % k, ref_length(ratio, k)
        expected = sorted({(s + i) % k for i in range(w)})
        assert all(p[name].tolist() == expected for p in plans)


def test_fedrolex_advances_one_unit_per_round():
    """Round t+1's window is round t's moved by one unit (backwards, mod K)."""
    k = 10
    w1 = set(RollingWindow().assign(request({"g": k}, 0.3, t=1)).plan["g"].tolist())
    w2 = set(RollingWindow().assign(request({"g": k}, 0.3, t=2)).plan["g"].tolist())
    assert w1 == {0, 1, 2} and w2 == {9, 0, 1}


@SETTINGS
@given(widths=widths_st, ratio=ratio_st, t=st.integers(1, 50), pid=st.integers(0, 99), seed=st.integers(0, 9))
def test_fd_draws_w_distinct_units_reproducibly(widths, ratio, t, pid, seed):
    """Federated Dropout: w distinct sorted units in [0, K); same request, same draw."""
    a = RandomSubset().assign(request(widths, ratio, t=t, pid=pid, seed=seed))
    b = RandomSubset().assign(request(widths, ratio, t=t, pid=pid, seed=seed))
    for name, k in widths.items():
        idx = a.plan[name].tolist()
        assert len(idx) == len(set(idx)) == ref_length(ratio, k)
        assert idx == sorted(idx) and all(0 <= i < k for i in idx)
        assert torch.equal(a.plan[name], b.plan[name])


def test_fd_is_fresh_per_participant_and_round_and_uniform():
    """Draws differ across participants and rounds and hit every unit about w/K of the time."""
    k, ratio, draws = 40, 0.25, 2000
    counts: Counter[int] = Counter()
    seen = set()
    for t in range(1, draws // 10 + 1):
        for pid in range(10):
            idx = RandomSubset().assign(request({"g": k}, ratio, t=t, pid=pid)).plan["g"].tolist()
            counts.update(idx)
            seen.add(tuple(idx))
    assert len(seen) > 0.99 * draws  # practically never the same subset twice
    expected = draws * ref_length(ratio, k) / k  # 500 per unit
    assert all(abs(c - expected) < 0.2 * expected for c in (counts[u] for u in range(k)))


@SETTINGS
@given(widths=widths_st, ratio=ratio_st, levels=st.integers(1, 10), t=st.integers(1, 30), pid=st.integers(0, 30))
def test_fjord_takes_a_prefix_of_a_width_from_the_capped_grid(widths, ratio, levels, t, pid):
    """FjORD: p is a grid point i/levels <= r (or r when none fits); the plan is the first round(p K) units."""
    a = OrderedDropout(levels).assign(request(widths, ratio, t=t, pid=pid))
    grid = [i / levels for i in range(1, levels + 1) if i / levels <= ratio + 1e-12]
    assert (a.rate in grid) if grid else (a.rate == ratio)
    assert a.rate <= ratio + 1e-12
    for name, k in widths.items():
        assert a.plan[name].tolist() == list(range(ref_length(a.rate, k)))


def test_fjord_width_is_uniform_over_the_capped_grid():
    """With r = 0.5 and 8 levels, p is 1/8, 2/8, 3/8 or 4/8, each about a quarter of the time."""
    rates = Counter(
        OrderedDropout(8).assign(request({"g": 64}, 0.5, t=t, pid=pid)).rate for t in range(1, 101) for pid in range(10)
    )
    assert set(rates) == {0.125, 0.25, 0.375, 0.5}
    assert all(200 <= n <= 300 for n in rates.values())


def test_full_width_and_ablation_without_inter_participant_shift():
    """FullWidth holds everything at rate 1; DoubleShift without the first term gives every rank the same window."""
    a = FullWidth().assign(request({"g": 7, "h": 3}, 0.25))
    assert a.rate == 1.0 and a.plan["g"].tolist() == list(range(7)) and a.plan["h"].tolist() == [0, 1, 2]
    shift = DoubleShift(shift_step=3, inter_participant=False)
    plans = [shift.assign(request({"g": 20}, 0.25, rank=j, m=5, t=4)).plan["g"].tolist() for j in range(5)]
    assert all(p == [9, 10, 11, 12, 13] for p in plans)


def test_budgets_node_config_wins_then_list_then_default():
    """A node's own split-ratio beats the budgets list, which cycles over partition ids."""
    budgets = Budgets(0.25, (0.125, 0.5))
    assert budgets.ratio(NodeProfile(3, 1.0)) == 1.0
    assert [budgets.ratio(NodeProfile(p)) for p in range(4)] == [0.125, 0.5, 0.125, 0.5]
    assert Budgets(0.25).ratio(NodeProfile(5)) == 0.25


@pytest.mark.parametrize("method", sorted(POLICIES))
def test_every_method_sends_sub_models_sized_by_the_budgets(method):
    """Each participant's message is cut to its own budget (budgets list), for every partial-training method
    (msfusion with the paper's rolling windows: its default blocks are cut at the smallest budget, test_block_windows)."""
    paper = MSFUSION_PAPER if method == "msfusion" else {}
    config = RunConfig.from_mapping({"method": method, "budgets": "0.25,0.5,1.0", "split-ratio": 0.25, **paper})
    global_model = build_model("cnn", global_widths(config))
    spec = SplitSpec.from_model(global_model)
    strategy = make_strategy(config, spec)
    grid = LoopbackGrid(3)
    messages = strategy.configure_train(2, ArrayRecord(global_model.state_dict()), client_config(config), grid)
    sent = {strategy.profile(m.metadata.dst_node_id).partition_id: m for m in messages}
    assert sorted(sent) == [0, 1, 2]
    for pid, budget in enumerate((0.25, 0.5, 1.0)):
        plan, widths = decode_plan(sent[pid].content.config_records[PLAN])
        rate = sent[pid].content.config_records[CONFIG]["split-rate"]
        if method == "fedavg-small":
            assert widths == {g: round(0.25 * k) for g, k in build_model("cnn").FULL_WIDTHS.items()}
            assert rate == 1.0 and all(len(plan[g]) == widths[g] for g in widths)
            continue
        assert widths == build_model("cnn").FULL_WIDTHS
        assert rate <= budget
        assert all(len(plan[g]) == round(rate * k) for g, k in widths.items())
        if method != "fjord":
            assert rate == budget
    contrastive = {m.content.config_records[CONFIG]["contrastive-weight"] for m in messages}
    assert contrastive == ({1.0} if method == "msfusion" else {0.0})
