"""Robust overlap-aware aggregation against a per-element reference, and what it does to outsized updates.

The reference is written from the rules' definitions (engine/robust.py's
docstring), element by element over the updates that held it, with the tiny
two-group spec of test_splitting (fused blocks, two split dims, integer buffers).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_splitting import TINY_DTYPES, TINY_SHAPES, local_index, local_shape, random_tensor, tiny_plans, tiny_spec

from msfusion_flwr.config import RunConfig
from msfusion_flwr.engine import RunningMean, SplitSpec, SubmodelUpdate, aggregate, slice_state
from msfusion_flwr.engine.fusion import aggregate_screened
from msfusion_flwr.engine.policies import FullWidth
from msfusion_flwr.engine.robust import AggregationRule
from msfusion_flwr.models import build_model
from msfusion_flwr.server.methods import make_strategy
from msfusion_flwr.server.strategy import MeteredFedAvg, SubmodelStrategy


def reference_weights(rule: AggregationRule, claims: list[float]) -> list[float]:
    if rule.weighting == "equal":
        return [1.0] * len(claims)
    if rule.weighting == "capped":
        cap = rule.weight_cap * statistics.median(claims)
        return [min(c, cap) for c in claims]
    return list(claims)


def reference_clip(rule: AggregationRule, global_state, plans, states):
    """Each update's states with its delta scaled to at most clip x the median RMS delta (floating tensors)."""
    if rule.clip == 0:
        return states
    rms = []
    for plan, state in zip(plans, states):
        total, count = 0.0, 0
        for key, shape in TINY_SHAPES.items():
            if key in TINY_DTYPES:
                continue
            for index in itertools.product(*(range(n) for n in shape)):
                local = local_index(key, index, plan)
                if local is not None:
                    total += (state[key][local].double().item() - global_state[key][index].double().item()) ** 2
                    count += 1
        rms.append(math.sqrt(total / count))
    bound = rule.clip * statistics.median(rms)
    clipped = []
    for plan, state, r in zip(plans, states, rms):
        factor = 1.0 if r <= bound else bound / r
        new = {}
        for key, shape in TINY_SHAPES.items():
            new[key] = state[key].double().clone() if key not in TINY_DTYPES else state[key].clone()
            if key in TINY_DTYPES:
                continue
            for index in itertools.product(*(range(n) for n in shape)):
                local = local_index(key, index, plan)
                if local is not None:
                    g = global_state[key][index].double().item()
                    new[key][local] = g + factor * (state[key][local].double().item() - g)
        clipped.append(new)
    return clipped


def reference_statistic(rule: AggregationRule, values: list[float], weights: list[float]) -> float:
    if rule.statistic == "mean":
        return sum(v * w for v, w in zip(values, weights)) / sum(weights)
    ordered = sorted(values)
    if rule.statistic == "median":
        return statistics.median(ordered)
    cut = math.floor(len(ordered) * rule.trim_fraction)
    kept = ordered[cut : len(ordered) - cut]
    return sum(kept) / len(kept)


def reference_aggregate(rule: AggregationRule, global_state, plans, states, claims):
    weights = reference_weights(rule, claims)
    states = reference_clip(rule, global_state, plans, states)
    out = {}
    for key, shape in TINY_SHAPES.items():
        result = global_state[key].clone()
        for index in itertools.product(*(range(n) for n in shape)):
            held = [(state[key][local].double().item(), w) for plan, state, w in zip(plans, states, weights)
                    if (local := local_index(key, index, plan)) is not None]  # fmt: skip
            if held:
                value = reference_statistic(rule, [v for v, _ in held], [w for _, w in held])
                result[index] = round(value) if key in TINY_DTYPES else value
        out[key] = result
    return out


rules = st.builds(
    AggregationRule,
    statistic=st.sampled_from(["mean", "median", "trimmed-mean"]),
    trim_fraction=st.sampled_from([0.0, 0.2, 0.34, 0.49]),
    weighting=st.sampled_from(["examples", "capped", "equal", "reference"]),
    weight_cap=st.sampled_from([1.0, 1.5, 3.0]),
    clip=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)


@settings(max_examples=120, deadline=None)
@given(
    rule=rules,
    plans=st.lists(tiny_plans(), min_size=1, max_size=6),
    claims=st.lists(st.integers(min_value=1, max_value=9), min_size=6, max_size=6),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_every_rule_matches_its_per_element_definition(rule, plans, claims, seed):
    """Weights, clipping and the statistic over holders equal the definitions, element by element."""
    gen = torch.Generator().manual_seed(seed)
    global_state = {k: random_tensor(gen, s, TINY_DTYPES.get(k, torch.float32)) for k, s in TINY_SHAPES.items()}
    states = [
        {k: random_tensor(gen, local_shape(k, plan), TINY_DTYPES.get(k, torch.float32)) for k in TINY_SHAPES}
        for plan in plans
    ]
    claims = [float(c) for c in claims[: len(plans)]]
    updates = [
        SubmodelUpdate({g: torch.tensor(u) for g, u in plan.items()}, state, c)
        for plan, state, c in zip(plans, states, claims)
    ]
    merged = aggregate(global_state, tiny_spec(), updates, rule=rule)
    expected = reference_aggregate(rule, global_state, plans, states, claims)
    for key in TINY_SHAPES:
        assert merged[key].dtype == global_state[key].dtype and merged[key].shape == global_state[key].shape
        if key in TINY_DTYPES:
            assert torch.equal(merged[key], expected[key]), key
        else:
            torch.testing.assert_close(merged[key], expected[key].float(), rtol=1e-5, atol=1e-5)


def test_order_statistics_work_in_chunks(monkeypatch):
    """Chunking the elements (bounded memory) gives the same result as one pass."""
    gen = torch.Generator().manual_seed(0)
    spec = tiny_spec()
    global_state = {k: random_tensor(gen, s, TINY_DTYPES.get(k, torch.float32)) for k, s in TINY_SHAPES.items()}
    plans = [{"g1": [0, 2], "g2": [1, 2, 3]}, {"g1": [1, 2], "g2": [0, 1]}, {"g1": [2], "g2": [1, 3]}]
    updates = [
        SubmodelUpdate({g: torch.tensor(u) for g, u in p.items()},
                       {k: random_tensor(gen, local_shape(k, p), TINY_DTYPES.get(k, torch.float32)) for k in TINY_SHAPES}, 1.0)
        for p in plans
    ]  # fmt: skip
    rule = AggregationRule(statistic="median")
    whole = aggregate(global_state, spec, updates, rule=rule)
    monkeypatch.setattr("msfusion_flwr.engine.fusion.ORDER_CHUNK", 4)  # 1 element per chunk with 3 updates
    chunked = aggregate(global_state, spec, updates, rule=rule)
    for key in TINY_SHAPES:
        assert torch.equal(whole[key], chunked[key]), key


# --------------------------------------------------------------------------- what the rules protect against


@pytest.fixture(scope="module")
def cnn():
    model = build_model("cnn", {"conv1": 8, "conv2": 8, "conv3": 8, "fc": 16})
    return SplitSpec.from_model(model), {k: v.clone() for k, v in model.state_dict().items()}


def honest_and_hostile(spec, state, attack, num_honest=4):
    """Full-model updates: ``num_honest`` small random steps, and one hostile update made by ``attack(delta)``."""
    gen = torch.Generator().manual_seed(1)
    plan = spec.full_plan()
    updates = []
    for _ in range(num_honest + 1):
        step = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()}
        updates.append(SubmodelUpdate(plan, step, 100.0))
    hostile = {k: (state[k] + attack(v - state[k])) if v.is_floating_point() else v for k, v in updates[-1].state.items()}
    updates[-1] = SubmodelUpdate(plan, hostile, updates[-1].weight)
    return updates


def distance(a, b):
    return math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in a if a[k].is_floating_point()))


@pytest.mark.parametrize(
    "rule",
    [AggregationRule(statistic="median"), AggregationRule(statistic="trimmed-mean"), AggregationRule(clip=1.0)],
    ids=["median", "trimmed-mean", "clip"],
)
def test_robust_rules_bound_an_outsized_update_that_takes_over_the_plain_mean(cnn, rule):
    """One update scaled by 1e6 moves the plain mean by ~2e5 honest steps; robust rules stay near the honest mean."""
    spec, state = cnn
    updates = honest_and_hostile(spec, state, lambda delta: 1e6 * delta)
    honest = aggregate(state, spec, updates[:-1])
    step = distance(honest, state)
    assert distance(aggregate(state, spec, updates), honest) > 1e4 * step
    assert distance(aggregate(state, spec, updates, rule=rule), honest) < 1.5 * step


def test_capped_weights_stop_an_inflated_count_from_owning_the_model(cnn):
    """A reply claiming 1e6 examples gets the plain mean; capped or equal weights keep it to a share."""
    spec, state = cnn
    updates = honest_and_hostile(spec, state, lambda delta: -10 * delta)
    updates[-1] = SubmodelUpdate(updates[-1].plan, updates[-1].state, 1e6)
    hostile = updates[-1].state
    assert distance(aggregate(state, spec, updates), hostile) < 1e-3 * distance(hostile, state)
    for weighting in ("capped", "equal"):
        fused = aggregate(state, spec, updates, rule=AggregationRule(weighting=weighting))
        assert distance(fused, hostile) > 0.6 * distance(hostile, state), weighting


def test_plain_rule_is_todays_aggregation(cnn):
    """The default rule is exactly the example-weighted mean (no clipping, no reweighting)."""
    spec, state = cnn
    updates = honest_and_hostile(spec, state, lambda delta: 3 * delta)
    assert AggregationRule().plain
    explicit = aggregate(state, spec, updates, rule=AggregationRule(statistic="mean", weighting="examples", clip=0.0))
    default = aggregate(state, spec, updates)
    assert all(torch.equal(explicit[k], default[k]) for k in state)


def test_fedavg_with_a_robust_rule_runs_through_the_engine_on_the_full_model(cnn):
    """Flower's FedAvg for the plain rule; any other rule: the engine, every participant holding the whole model."""
    spec, _ = cnn
    assert isinstance(make_strategy(RunConfig.from_mapping({"method": "fedavg"}), spec), MeteredFedAvg)
    strategy = make_strategy(RunConfig.from_mapping({"method": "fedavg", "aggregation": "median"}), spec)
    assert isinstance(strategy, SubmodelStrategy) and isinstance(strategy.policy, FullWidth)
    assert strategy.rule == AggregationRule(statistic="median")
    robust_msfusion = make_strategy(RunConfig.from_mapping({"clip-updates": 2.0, "aggregation-weights": "equal"}), spec)
    assert robust_msfusion.rule == AggregationRule(weighting="equal", clip=2.0)


def test_slices_of_a_robust_aggregate_stay_consistent(cnn):
    """With partial plans, only held elements change under every rule."""
    spec, state = cnn
    plan = {name: torch.arange(2) for name in spec.widths}
    sub = slice_state(state, spec, plan)
    bumped = {k: v + 1 if v.is_floating_point() else v for k, v in sub.items()}
    for statistic in ("median", "trimmed-mean"):
        merged = aggregate(state, spec, [SubmodelUpdate(plan, bumped, 1.0)], rule=AggregationRule(statistic=statistic))
        again = slice_state(merged, spec, plan)
        assert all(torch.allclose(again[k].float(), bumped[k].float()) for k in sub)
        changed = sum(int((merged[k] != state[k]).sum()) for k in state)
        assert changed == sum(int((bumped[k] != sub[k]).sum()) for k in sub)


def test_screening_leaves_out_exactly_the_updates_that_point_away_from_the_others():
    """aggregate_screened drops update k (here the only one) iff the cosine between its delta and the other holders' mean delta, on the
    elements it shares with them, is <= 0 (computed here element by element), then fuses the rest with the rule."""
    gen = torch.Generator().manual_seed(5)
    spec = tiny_spec()
    global_state = {k: random_tensor(gen, s, TINY_DTYPES.get(k, torch.float32)) for k, s in TINY_SHAPES.items()}
    full = {"g1": [0, 1, 2], "g2": [0, 1, 2, 3]}
    plans = [full, {"g1": [0, 1], "g2": [1, 2, 3]}, {"g1": [1, 2], "g2": [0, 1]}, {"g1": [0, 2], "g2": [2, 3]}]  # 3: hostile
    step = {k: 0.1 * torch.randn(s, generator=gen) for k, s in TINY_SHAPES.items() if k not in TINY_DTYPES}
    updates = []
    for i, plan in enumerate(plans):
        noisy = {k: step[k] + 0.05 * torch.randn(step[k].shape, generator=gen) for k in step}
        moved = {k: (global_state[k] + (noisy[k] if i != 3 else -noisy[k])) if k in step else global_state[k] for k in TINY_SHAPES}
        updates.append(SubmodelUpdate({g: torch.tensor(u) for g, u in plan.items()}, slice_state(moved, spec, {g: torch.tensor(u) for g, u in plan.items()}), 1.0))
    by_hand = []
    for k, (plan, update) in enumerate(zip(plans, updates)):
        sums = {1: [0.0, 0.0, 0.0], 2: [0.0, 0.0, 0.0]}  # over elements shared with >= 1 / >= 2 others
        for key in step:
            for index in itertools.product(*(range(n) for n in TINY_SHAPES[key])):
                mine = local_index(key, index, plan)
                others = [(p, u) for j, (p, u) in enumerate(zip(plans, updates)) if j != k and local_index(key, index, p) is not None]
                if mine is None or not others:
                    continue
                g = global_state[key][index].item()
                d = update.state[key][mine].item() - g
                r = sum(u.state[key][local_index(key, index, p)].item() - g for p, u in others) / len(others)
                for least in (1, 2):
                    if len(others) >= least:
                        sums[least] = [sums[least][0] + d * r, sums[least][1] + d * d, sums[least][2] + r * r]
        dot, own, ref = sums[2] if sums[2][1] > 0 else sums[1]
        by_hand.append(dot / math.sqrt(own * ref))
    rule = AggregationRule(statistic="median", weighting="equal", screen=True)
    merged, dropped = aggregate_screened(global_state, spec, updates, rule=rule)
    assert [k for k, c in enumerate(by_hand) if c <= 0] == dropped == [3]
    expected = aggregate(global_state, spec, updates[:3], rule=AggregationRule(statistic="median", weighting="equal"))
    assert all(torch.equal(merged[k], expected[k]) for k in TINY_SHAPES)
    honest, none = aggregate_screened(global_state, spec, updates[:3], rule=rule)
    assert none == [] and all(torch.equal(honest[k], expected[k]) for k in TINY_SHAPES)


def test_screening_catches_a_flipped_update_where_the_median_of_two_holders_cannot():
    """Honest A holds the whole model, honest B, D and E one quarter of it, hostile C the whole model and sends
    -10 x its own update. Outside the quarter only A and C hold an element: the median of two is their mean, and
    there A and C are each other's only co-holder. Judged on the quarter, where each has three others, C points
    away from the rest and screening drops it as a whole."""
    model = build_model("cnn", {"conv1": 8, "conv2": 8, "conv3": 8, "fc": 16})
    spec, state = SplitSpec.from_model(model), model.state_dict()
    gen = torch.Generator().manual_seed(2)
    step = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items() if v.is_floating_point()}

    def trained():  # a common direction (the gradient) plus a participant's own noise
        return {k: v + step[k] + 0.005 * torch.randn(v.shape, generator=gen) if k in step else v for k, v in state.items()}

    full, quarter = spec.full_plan(), {n: torch.arange(w // 2) for n, w in spec.widths.items()}
    honest = [SubmodelUpdate(full, trained(), 1.0)]
    honest += [SubmodelUpdate(quarter, slice_state(trained(), spec, quarter), 1.0) for _ in range(3)]
    c = trained()
    hostile = SubmodelUpdate(full, {k: state[k] - 10 * (c[k] - state[k]) for k in state}, 1.0)
    for rule in (AggregationRule(clip=1.0), AggregationRule(statistic="median", clip=1.0), AggregationRule(weighting="equal", clip=2.0)):
        screened, dropped = aggregate_screened(state, spec, [*honest, hostile], rule=dataclasses.replace(rule, screen=True))
        assert dropped == [4], rule
        target = aggregate(state, spec, honest, rule=rule)
        assert distance(screened, target) < 1e-9, rule
        assert distance(aggregate(state, spec, [*honest, hostile], rule=rule), target) > 0.3 * distance(target, state), rule


streaming_rules = st.builds(
    AggregationRule,
    weighting=st.sampled_from(["examples", "equal"]),
    noise_std=st.sampled_from([0.0, 0.7]),
)


@settings(max_examples=60, deadline=None)
@given(
    rule=streaming_rules,
    plans=st.lists(tiny_plans(), min_size=1, max_size=6),
    claims=st.lists(st.integers(min_value=1, max_value=9), min_size=6, max_size=6),
    calibrate=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_folding_updates_one_at_a_time_is_the_aggregate_bit_for_bit(rule, plans, claims, calibrate, seed):
    """RunningMean over the updates in the order aggregate takes them equals aggregate exactly: every tensor,
    integer buffers and the DP noise (the same generator state) included (calibration: the strategy-level test)."""
    gen = torch.Generator().manual_seed(seed)
    global_state = {k: random_tensor(gen, s, TINY_DTYPES.get(k, torch.float32)) for k, s in TINY_SHAPES.items()}
    updates = [
        SubmodelUpdate(
            {g: torch.tensor(u) for g, u in plan.items()},
            {k: random_tensor(gen, local_shape(k, plan), TINY_DTYPES.get(k, torch.float32)) for k in TINY_SHAPES},
            float(c),
        )
        for plan, c in zip(plans, claims)
    ]
    spec = tiny_spec()
    expected = aggregate(global_state, spec, updates, calibrate, rule, torch.Generator().manual_seed(seed))
    running = RunningMean(global_state, spec, calibrate, rule)
    for update in updates:
        running.add(update)
    merged = running.result(torch.Generator().manual_seed(seed))
    assert merged.keys() == expected.keys()
    for key in expected:
        assert merged[key].dtype == expected[key].dtype and torch.equal(merged[key], expected[key]), key


@pytest.mark.parametrize(
    "rule",
    [AggregationRule(statistic="median"), AggregationRule(weighting="capped"), AggregationRule(clip=1.0), AggregationRule(screen=True)],
)
def test_a_rule_that_needs_the_whole_round_cannot_be_folded(rule):
    assert not rule.streams
    with pytest.raises(ValueError, match="cannot be folded one at a time"):
        RunningMean({}, tiny_spec(), rule=rule)
