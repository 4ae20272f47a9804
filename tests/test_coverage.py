"""Coverage accounting against a brute-force count of the elements each plan holds."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msfusion_flwr.engine import DoubleShift, SplitSpec, axis_positions
from msfusion_flwr.engine.coverage import Coverage
from msfusion_flwr.models import build_model

TINY = {"conv1": 3, "conv2": 4, "conv3": 5, "fc": 6}


def tiny_cnn():
    return build_model("cnn", TINY)


def brute_force_held(spec: SplitSpec, state: dict, plans: list[dict]) -> dict[str, torch.Tensor]:
    """Element by element: held iff some plan holds every split index of it."""
    claims: dict[str, list] = {}
    for group in spec.groups.values():
        for axis in group.axes:
            claims.setdefault(axis.tensor, []).append((group, axis))
    out = {}
    for key, tensor in state.items():
        held = torch.zeros(tensor.shape, dtype=torch.bool)
        for plan in plans:
            allowed = [set(range(n)) for n in tensor.shape]
            for group, axis in claims.get(key, []):
                allowed[axis.dim] = set(axis_positions(axis, group.width, plan[group.name]).tolist())
            for index in itertools.product(*(range(n) for n in tensor.shape)):
                if all(i in allowed[d] for d, i in enumerate(index)):
                    held[index] = True
        out[key] = held.reshape(-1)
    return out


@st.composite
def tiny_plans(draw: st.DrawFn) -> list[dict[str, torch.Tensor]]:
    plans = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        plans.append(
            {g: torch.tensor(sorted(draw(st.sets(st.integers(0, k - 1), min_size=1, max_size=k))), dtype=torch.long)
             for g, k in TINY.items()}
        )  # fmt: skip
    return plans


@settings(max_examples=12, deadline=None)
@given(rounds=st.lists(tiny_plans(), min_size=1, max_size=3))
def test_coverage_equals_a_brute_force_count(rounds):
    model = tiny_cnn()
    state = model.state_dict()
    spec = SplitSpec.from_model(model)
    coverage = Coverage(spec, state)
    ever = {k: torch.zeros(v.numel(), dtype=torch.bool) for k, v in state.items()}
    for plans in rounds:
        now = brute_force_held(spec, state, plans)
        report = coverage.update(plans)
        total = sum(v.numel() for v in state.values())
        for key in ever:
            ever[key] |= now[key]
        assert report.model_round == sum(int(m.sum()) for m in now.values()) / total
        assert report.model == sum(int(m.sum()) for m in ever.values()) / total
        split = [k for k in state if k in report.by_tensor]
        assert report.split == sum(int(ever[k].sum()) for k in split) / sum(state[k].numel() for k in split)
        for key in split:
            assert report.by_tensor[key] == (float(now[key].float().mean()), float(ever[key].float().mean()))
    assert set(report.by_tensor) == {k for k in state if k != "head.bias"}  # every tensor but the head's bias is split


def test_the_full_plan_covers_everything_and_no_plan_nothing():
    model = tiny_cnn()
    spec = SplitSpec.from_model(model)
    assert Coverage(spec, model.state_dict()).update([]).model == 0.0
    full = Coverage(spec, model.state_dict()).update([spec.full_plan()])
    assert full.model == full.model_round == full.split == 1.0


def test_rolling_windows_cover_conv2_slowly():
    """The issue's count: 10 participants at r = 1/4, 30 rounds of double shifting leave a third of conv2 untrained."""
    model = build_model("cnn")
    spec = SplitSpec.from_model(model)
    coverage = Coverage(spec, model.state_dict())
    policy = DoubleShift()
    for t in range(1, 31):
        report = coverage.update([policy.plan(spec.widths, 0.25, j, 10, t) for j in range(10)])
    assert 0.6 < report.by_tensor["conv2.0.weight"][1] < 0.75
    assert 0.5 < report.by_tensor["conv3.0.weight"][1] < 0.62
    assert report.by_tensor["conv2.0.bias"][1] == 1.0  # a bias follows one group: every unit is held by someone
