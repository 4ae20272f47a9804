"""Behaviour of the splitting engine: width groups, slicing and overlap-aware aggregation.

References here are written independently of the engine: the CNN's axes and
parameter count are listed by hand from models.py, and aggregation is checked
against a per-element Python loop over every global element.
"""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msfusion_flwr.engine import (
    Axis,
    SplitSpec,
    SubmodelUpdate,
    WidthGroup,
    aggregate,
    axis_positions,
    plan_widths,
    slice_state,
)
from msfusion_flwr.engine.policies import DoubleShift
from msfusion_flwr.models import build_model

FULL = {"conv1": 64, "conv2": 128, "conv3": 256, "fc": 512}

# tensor -> {dim: group}, read off models.FashionCNN by hand.
CNN_AXES: dict[str, dict[int, str]] = {
    "conv1.0.weight": {0: "conv1"},
    "conv1.0.bias": {0: "conv1"},
    "conv1.2.weight": {0: "conv1"},
    "conv1.2.bias": {0: "conv1"},
    "conv2.0.weight": {0: "conv2", 1: "conv1"},
    "conv2.0.bias": {0: "conv2"},
    "conv2.2.weight": {0: "conv2"},
    "conv2.2.bias": {0: "conv2"},
    "conv3.0.weight": {0: "conv3", 1: "conv2"},
    "conv3.0.bias": {0: "conv3"},
    "conv3.2.weight": {0: "conv3"},
    "conv3.2.bias": {0: "conv3"},
    "fc.weight": {0: "fc", 1: "conv3"},
    "fc.bias": {0: "fc"},
    "fc_norm.weight": {0: "fc"},
    "fc_norm.bias": {0: "fc"},
    "head.weight": {1: "fc"},
    "head.bias": {},
}


def cnn_param_count(c1: int, c2: int, c3: int, f: int, classes: int = 10, cin: int = 1) -> int:
    """Parameters of FashionCNN at the given widths, by hand (BN without running stats)."""
    conv = lambda i, o: i * o * 9 + o  # noqa: E731  3x3 kernel + bias
    bn = lambda c: 2 * c  # noqa: E731  weight + bias
    linear = lambda i, o: i * o + o  # noqa: E731
    return (
        conv(cin, c1) + bn(c1)
        + conv(c1, c2) + bn(c2)
        + conv(c2, c3) + bn(c3)
        + linear(c3, f) + bn(f)
        + linear(f, classes)
    )


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = build_model("cnn")
    return model, SplitSpec.from_model(model)


# --------------------------------------------------------------------------- (a)


def test_cnn_groups_and_axes(cnn):
    """The CNN declares conv1/conv2/conv3/fc of widths 64/128/256/512 on exactly the hand-listed axes."""
    model, spec = cnn
    state = model.state_dict()
    assert spec.widths == FULL
    assert set(state) == set(CNN_AXES)
    found = {(a.tensor, a.dim, g.name) for g in spec.groups.values() for a in g.axes}
    expected = {(t, d, g) for t, dims in CNN_AXES.items() for d, g in dims.items()}
    assert found == expected
    for group in spec.groups.values():
        for axis in group.axes:
            assert (axis.unit, axis.blocks) == (1, 1)
            assert state[axis.tensor].shape[axis.dim] == FULL[group.name]


def test_cnn_never_splits_input_channel_or_classes(cnn):
    """conv1.0.weight dim 1 (input channel), head.weight dim 0 and head.bias (classes) are in no group."""
    _, spec = cnn
    claimed = {(a.tensor, a.dim) for g in spec.groups.values() for a in g.axes}
    assert ("conv1.0.weight", 1) not in claimed
    assert ("head.weight", 0) not in claimed
    assert not any(t == "head.bias" for t, _ in claimed)
    narrow = slice_state(build_model("cnn").state_dict(), spec, {g: torch.arange(1) for g in FULL})
    assert narrow["conv1.0.weight"].shape[1] == 1
    assert narrow["head.weight"].shape[0] == 10
    assert narrow["head.bias"].shape == (10,)


# --------------------------------------------------------------------------- (b)


@st.composite
def cnn_plans(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    plan = {}
    for name, k in FULL.items():
        w = draw(st.integers(min_value=1, max_value=k), label=f"w_{name}")
        seed = draw(st.integers(min_value=0, max_value=2**32 - 1), label=f"seed_{name}")
        plan[name] = torch.tensor(sorted(random.Random(seed).sample(range(k), w)), dtype=torch.long)
    return plan


@settings(max_examples=25, deadline=None)
@given(plan=cnn_plans(), rate=st.floats(min_value=0.01, max_value=1.0))
def test_slice_state_fits_narrow_model(cnn, plan, rate):
    """slice_state has exactly the narrow model's shapes, loads strictly, and picks the planned elements."""
    model, spec = cnn
    full = model.state_dict()
    sub = slice_state(full, spec, plan)
    narrow = build_model("cnn", plan_widths(plan), rate)
    assert {k: tuple(v.shape) for k, v in sub.items()} == {
        k: tuple(v.shape) for k, v in narrow.state_dict().items()
    }
    narrow.load_state_dict(sub, strict=True)
    for key, dims in CNN_AXES.items():
        expected = full[key]
        for dim, group in dims.items():
            expected = expected[(slice(None),) * dim + (plan[group],)]
        assert torch.equal(sub[key], expected), key
    w = plan_widths(plan)
    n_params = sum(p.numel() for p in narrow.parameters())
    assert n_params == cnn_param_count(w["conv1"], w["conv2"], w["conv3"], w["fc"])
    assert sum(v.numel() for v in sub.values()) == n_params


def test_full_model_param_count_by_hand():
    """The full CNN has the hand-computed parameter count."""
    full = build_model("cnn")
    assert sum(p.numel() for p in full.parameters()) == cnn_param_count(64, 128, 256, 512) == 508298


def test_quarter_width_participant_is_much_smaller(cnn):
    """A participant at r = 0.25 trains well under a tenth of the full model's parameters."""
    _, spec = cnn
    plan = DoubleShift().plan(spec.widths, 0.25, 1, 4, 3)
    assert plan_widths(plan) == {"conv1": 16, "conv2": 32, "conv3": 64, "fc": 128}
    narrow = build_model("cnn", plan_widths(plan), 0.25)
    n = sum(p.numel() for p in narrow.parameters())
    assert n == cnn_param_count(16, 32, 64, 128)
    assert n < 0.1 * cnn_param_count(64, 128, 256, 512)


# --------------------------------------------------------------------------- (c)


def test_full_plan_single_update_is_identity(cnn):
    """Slicing at the full plan and aggregating that single update returns the global state."""
    model, spec = cnn
    state = model.state_dict()
    plan = spec.full_plan()
    sub = slice_state(state, spec, plan)
    for key in state:
        assert torch.equal(sub[key], state[key])
    for weight in (1.0, 3.7):
        merged = aggregate(state, spec, [SubmodelUpdate(plan, sub, weight)])
        assert set(merged) == set(state)
        for key in state:
            assert merged[key].dtype == state[key].dtype
            assert torch.equal(merged[key], state[key]), key


@settings(max_examples=6, deadline=None)
@given(
    ratios=st.lists(st.floats(min_value=0.05, max_value=1.0), min_size=1, max_size=4),
    weights=st.lists(st.floats(min_value=0.1, max_value=100.0), min_size=4, max_size=4),
    t=st.integers(min_value=1, max_value=20),
)
def test_unchanged_slices_leave_global_unchanged(cnn, ratios, weights, t):
    """Aggregating updates that equal their global slices leaves the global state unchanged."""
    model, spec = cnn
    state = model.state_dict()
    updates = []
    for rank, r in enumerate(ratios):
        plan = DoubleShift().plan(spec.widths, r, rank, len(ratios), t)
        updates.append(SubmodelUpdate(plan, slice_state(state, spec, plan), weights[rank]))
    merged = aggregate(state, spec, updates)
    for key in state:
        assert torch.equal(merged[key], state[key]), key


# --------------------------------------------------------------------------- (d)

K1, K2 = 3, 4
TINY_GROUPS = [
    # g1: fused 3-block projection with 2-row units (like q/k/v heads), and its consumer.
    WidthGroup("g1", K1, (Axis("qkv", 0, unit=2, blocks=3), Axis("proj", 1, unit=2))),
    # g2: plain units; qkv and proj are split along two dims (one per group).
    WidthGroup("g2", K2, (Axis("qkv", 1), Axis("proj", 0), Axis("bias", 0), Axis("count", 0))),
]
TINY_SHAPES = {
    "qkv": (K1 * 2 * 3, K2),
    "proj": (K2, K1 * 2),
    "bias": (K2,),
    "count": (K2,),
    "free": (2, 3),  # unsplit
    "steps": (),  # unsplit integer scalar
}
TINY_DTYPES = {"count": torch.int64, "steps": torch.int64}
# tensor -> {dim: (group name, width, unit, blocks)}, the same axes written by hand.
TINY_AXES = {
    "qkv": {0: ("g1", K1, 2, 3), 1: ("g2", K2, 1, 1)},
    "proj": {0: ("g2", K2, 1, 1), 1: ("g1", K1, 2, 1)},
    "bias": {0: ("g2", K2, 1, 1)},
    "count": {0: ("g2", K2, 1, 1)},
    "free": {},
    "steps": {},
}


def tiny_spec() -> SplitSpec:
    return SplitSpec(TINY_GROUPS, {k: torch.Size(v) for k, v in TINY_SHAPES.items()})


def ref_positions(width: int, unit: int, blocks: int, units: list[int]) -> list[int]:
    """Positions of the given units, from Axis's docstring: b*K*unit + i*unit + u."""
    return [b * width * unit + i * unit + u for b in range(blocks) for i in units for u in range(unit)]


def random_tensor(gen: torch.Generator, shape, dtype) -> torch.Tensor:
    if dtype == torch.int64:
        return torch.randint(-50, 51, shape, generator=gen, dtype=torch.int64)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


@st.composite
def tiny_plans(draw: st.DrawFn) -> dict[str, list[int]]:
    return {
        "g1": draw(st.lists(st.integers(0, K1 - 1), min_size=1, max_size=K1, unique=True)),
        "g2": draw(st.lists(st.integers(0, K2 - 1), min_size=1, max_size=K2, unique=True)),
    }


def local_shape(key: str, plan: dict[str, list[int]]) -> tuple[int, ...]:
    shape = list(TINY_SHAPES[key])
    for dim, (g, k, unit, blocks) in TINY_AXES[key].items():
        shape[dim] = len(ref_positions(k, unit, blocks, plan[g]))
    return tuple(shape)


def local_index(key: str, index: tuple[int, ...], plan: dict[str, list[int]]) -> tuple[int, ...] | None:
    """Where global element ``index`` of ``key`` sits in the slice cut with ``plan`` (None: not held)."""
    local = []
    for dim, coord in enumerate(index):
        if dim in TINY_AXES[key]:
            group, width, unit, blocks = TINY_AXES[key][dim]
            pos = ref_positions(width, unit, blocks, plan[group])
            if coord not in pos:
                return None
            local.append(pos.index(coord))
        else:
            local.append(coord)
    return tuple(local)


def reference_aggregate(global_state, plans, states, weights):
    """Per-element weighted mean over the updates holding each element (Python loops)."""
    out = {}
    for key, shape in TINY_SHAPES.items():
        result = global_state[key].clone()
        for index in itertools.product(*(range(n) for n in shape)):
            num, den = Fraction(0), Fraction(0)
            for plan, state, weight in zip(plans, states, weights):
                local = local_index(key, index, plan)
                if local is not None:
                    value = state[key][local].item()
                    num += Fraction(weight) * Fraction(value)
                    den += Fraction(weight)
            if den > 0:
                mean = num / den
                result[index] = round(mean) if key in TINY_DTYPES else float(mean)
        out[key] = result
    return out


@settings(max_examples=100, deadline=None)
@given(
    plans=st.lists(tiny_plans(), min_size=1, max_size=4),
    weights=st.lists(st.integers(min_value=1, max_value=9), min_size=4, max_size=4),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_aggregate_matches_per_element_reference(plans, weights, seed):
    """aggregate equals an element-by-element weighted mean over holders; unheld elements keep their value."""
    gen = torch.Generator().manual_seed(seed)
    spec = tiny_spec()
    global_state = {
        k: random_tensor(gen, shape, TINY_DTYPES.get(k, torch.float32)) for k, shape in TINY_SHAPES.items()
    }
    states = [
        {k: random_tensor(gen, local_shape(k, plan), TINY_DTYPES.get(k, torch.float32)) for k in TINY_SHAPES}
        for plan in plans
    ]
    weights = [float(w) for w in weights[: len(plans)]]
    updates = [
        SubmodelUpdate({g: torch.tensor(u, dtype=torch.long) for g, u in plan.items()}, state, w)
        for plan, state, w in zip(plans, states, weights)
    ]
    # the sliced global state has the shapes the reference expects
    for plan, update in zip(plans, updates):
        sliced = slice_state(global_state, spec, update.plan)
        assert {k: tuple(v.shape) for k, v in sliced.items()} == {k: local_shape(k, plan) for k in TINY_SHAPES}
    merged = aggregate(global_state, spec, updates)
    expected = reference_aggregate(global_state, plans, states, weights)
    for key in TINY_SHAPES:
        assert merged[key].dtype == global_state[key].dtype
        assert merged[key].shape == global_state[key].shape
        if key in TINY_DTYPES:
            assert torch.equal(merged[key], expected[key]), key
        else:
            torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)


def test_aggregate_rounds_integer_buffers():
    """Integer tensors get the weighted mean rounded to the nearest integer (half to even)."""
    spec = tiny_spec()
    global_state = {k: torch.zeros(s, dtype=TINY_DTYPES.get(k, torch.float32)) for k, s in TINY_SHAPES.items()}
    global_state["count"] = torch.tensor([7, 7, 7, 7])
    plan_a = {"g1": torch.tensor([0]), "g2": torch.tensor([0, 1, 2])}
    plan_b = {"g1": torch.tensor([1]), "g2": torch.tensor([1, 2])}
    a = {k: v.clone() for k, v in slice_state(global_state, spec, plan_a).items()}
    b = {k: v.clone() for k, v in slice_state(global_state, spec, plan_b).items()}
    a["count"] = torch.tensor([1, 1, 2])  # units 0, 1, 2
    b["count"] = torch.tensor([4, 3])  # units 1, 2
    a["steps"], b["steps"] = torch.tensor(10), torch.tensor(13)
    merged = aggregate(global_state, spec, [SubmodelUpdate(plan_a, a, 1.0), SubmodelUpdate(plan_b, b, 2.0)])
    # unit0: 1; unit1: (1 + 8)/3 = 3; unit2: (2 + 6)/3 = 2.67 -> 3; unit3 untouched: 7
    assert merged["count"].tolist() == [1, 3, 3, 7]
    assert merged["count"].dtype == torch.int64
    # (10 + 26) / 3 = 12
    assert merged["steps"].item() == 12
    c = {**b, "count": torch.tensor([1, 2])}
    merged = aggregate(global_state, spec, [SubmodelUpdate(plan_b, b, 1.0), SubmodelUpdate(plan_b, c, 1.0)])
    # unit1: (4 + 1)/2 = 2.5 -> 2, unit2: (3 + 2)/2 = 2.5 -> 2 (half to even)
    assert merged["count"].tolist() == [7, 2, 2, 7]


# --------------------------------------------------------------------------- (e)


def test_spec_rejects_axis_of_wrong_size():
    """An axis whose tensor dimension is not width * unit * blocks is a ValueError."""
    shapes = {"w": torch.Size([6, 4])}
    with pytest.raises(ValueError, match="w dim 0"):
        SplitSpec([WidthGroup("g", 4, (Axis("w", 0),))], shapes)
    with pytest.raises(ValueError):
        SplitSpec([WidthGroup("g", 2, (Axis("w", 0, unit=2, blocks=2),))], shapes)  # 8 != 6
    SplitSpec([WidthGroup("g", 3, (Axis("w", 0, unit=2),))], shapes)  # 6 == 3 * 2


def test_spec_rejects_dim_claimed_twice():
    """The same tensor dim in two groups (or twice in one) is a ValueError."""
    shapes = {"w": torch.Size([4, 4])}
    with pytest.raises(ValueError, match="two groups"):
        SplitSpec([WidthGroup("a", 4, (Axis("w", 0),)), WidthGroup("b", 4, (Axis("w", 0),))], shapes)
    with pytest.raises(ValueError):
        SplitSpec([WidthGroup("a", 4, (Axis("w", 1), Axis("w", 1)))], shapes)
    SplitSpec([WidthGroup("a", 4, (Axis("w", 0),)), WidthGroup("b", 4, (Axis("w", 1),))], shapes)


def test_spec_rejects_unknown_tensor_and_duplicate_names():
    """An axis on a missing tensor, or two groups of one name, is a ValueError."""
    shapes = {"w": torch.Size([4])}
    with pytest.raises(ValueError):
        SplitSpec([WidthGroup("a", 4, (Axis("missing", 0),))], shapes)
    with pytest.raises(ValueError):
        SplitSpec([WidthGroup("a", 4, (Axis("w", 0),)), WidthGroup("a", 4, ())], shapes)


# --------------------------------------------------------------------------- (f)


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(min_value=1, max_value=8),
    unit=st.integers(min_value=1, max_value=4),
    blocks=st.integers(min_value=1, max_value=4),
    data=st.data(),
)
def test_axis_positions_matches_definition(width, unit, blocks, data):
    """axis_positions lists b*K*unit + i*unit + u for every block, held unit (in plan order) and offset."""
    units = data.draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=width, unique=True))
    got = axis_positions(Axis("t", 0, unit, blocks), width, torch.tensor(units, dtype=torch.long))
    assert got.tolist() == ref_positions(width, unit, blocks, units)
    if units == list(range(width)):
        assert got.tolist() == list(range(width * unit * blocks))
