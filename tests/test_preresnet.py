"""PreResNet-18's width groups: valid spec, residual-coupled streams, slices that are real sub-networks."""

from __future__ import annotations

import pytest
import torch

from msfusion_flwr.engine import SplitSpec, flat_positions, plan_widths, slice_state
from msfusion_flwr.engine.policies import DoubleShift
from msfusion_flwr.models import MODELS, PreResNet18, build_model

RATE = 0.25


@pytest.fixture(scope="module")
def full() -> PreResNet18:
    torch.manual_seed(0)
    return build_model("preresnet18")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def spec(full) -> SplitSpec:
    return SplitSpec.from_model(full)


def group_of(spec: SplitSpec, tensor: str, dim: int) -> str | None:
    for group in spec.groups.values():
        if any(a.tensor == tensor and a.dim == dim for a in group.axes):
            return group.name
    return None


def test_registered_and_spec_valid(full, spec):
    """Registered as "preresnet18"; every declared axis has the group's size; the widths are FULL_WIDTHS;
    exactly the input channels, the classes and the kernels stay unsplit."""
    assert MODELS["preresnet18"] is PreResNet18
    assert spec.widths == PreResNet18.FULL_WIDTHS
    state = full.state_dict()
    for group in spec.groups.values():
        for axis in group.axes:
            assert state[axis.tensor].shape[axis.dim] == group.width
    for key, tensor in state.items():
        claimed = {d for d in range(tensor.dim()) if group_of(spec, key, d)}
        if key == "conv1.weight":
            expected = {0}  # in-channels (RGB) never split
        elif key == "head.weight":
            expected = {1}  # classes never split
        elif key == "head.bias":
            expected = set()
        elif tensor.dim() == 4:
            expected = {0, 1}  # conv out/in channels; kernel dims unsplit
        else:
            expected = {0}  # norm weight and bias
        assert claimed == expected, key
    assert sum(p.numel() for p in full.parameters()) == 11_172_170  # ResNet-18 on CIFAR-10


def test_residual_streams_are_coupled(spec):
    """Everything added to or read from a stage's residual stream is in that stage's group."""
    expect = {
        "layer1": [
            ("conv1.weight", 0),
            ("layer1.0.conv2.weight", 0), ("layer1.1.conv2.weight", 0),
            ("layer1.0.n1.weight", 0), ("layer1.0.conv1.weight", 1),
            ("layer2.0.n1.weight", 0), ("layer2.0.conv1.weight", 1), ("layer2.0.shortcut.weight", 1),
        ],
        "layer2": [
            ("layer2.0.shortcut.weight", 0), ("layer2.0.conv2.weight", 0), ("layer2.1.conv2.weight", 0),
            ("layer2.1.n1.bias", 0), ("layer2.1.conv1.weight", 1),
            ("layer3.0.n1.weight", 0), ("layer3.0.conv1.weight", 1), ("layer3.0.shortcut.weight", 1),
        ],
        "layer3": [("layer3.0.shortcut.weight", 0), ("layer3.1.conv2.weight", 0), ("layer4.0.shortcut.weight", 1)],
        "layer4": [
            ("layer4.0.shortcut.weight", 0), ("layer4.0.conv2.weight", 0), ("layer4.1.conv2.weight", 0),
            ("n4.weight", 0), ("n4.bias", 0), ("head.weight", 1),
        ],
        "layer3.1": [("layer3.1.conv1.weight", 0), ("layer3.1.n2.weight", 0), ("layer3.1.conv2.weight", 1)],
    }  # fmt: skip
    for group, axes in expect.items():
        for tensor, dim in axes:
            assert group_of(spec, tensor, dim) == group, (tensor, dim)
    assert PreResNet18.feature_group == "layer4"
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for block in (0, 1):
            inner = f"{stage}.{block}"
            assert {a.tensor for a in spec.groups[inner].axes} == {
                f"{inner}.conv1.weight", f"{inner}.n2.weight", f"{inner}.n2.bias", f"{inner}.conv2.weight"
            }  # fmt: skip


@pytest.mark.parametrize("rank,round_", [(0, 1), (3, 2), (1, 7)])
def test_double_shift_slice_loads_and_runs(full, spec, rank, round_):
    """A width-0.25 DoubleShift slice loads strictly into the narrow model, which maps (2,3,32,32) to (2,10)."""
    plan = DoubleShift().plan(spec.widths, RATE, rank, 4, round_)
    sub = build_model("preresnet18", plan_widths(plan), RATE)
    sub.load_state_dict(slice_state(full.state_dict(), spec, plan), strict=True)
    assert sub.features(torch.randn(2, 3, 32, 32)).shape == (2, plan_widths(plan)["layer4"])
    out = sub(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_full_ratio_slice_is_the_full_model(full, spec):
    """At r = 1 the plan holds every unit; the sliced model's eval output equals the full model's bit for bit."""
    plan = DoubleShift().plan(spec.widths, 1.0, 2, 4, 5)
    sub = build_model("preresnet18", plan_widths(plan), 1.0)
    sub.load_state_dict(slice_state(full.state_dict(), spec, plan), strict=True)
    x = torch.randn(4, 3, 32, 32)
    full.eval(), sub.eval()
    with torch.no_grad():
        assert torch.equal(sub(x), full(x))


def test_slice_equals_full_model_with_unheld_units_zeroed(full, spec):
    """A random plan (independent windows per group) gives a sub-model whose eval output equals the full model's
    with every weight outside the slice set to zero: slicing respects the residual wiring."""
    gen = torch.Generator().manual_seed(1)
    plan = {
        name: torch.sort(torch.randperm(width, generator=gen)[: max(1, width // 4)]).values
        for name, width in spec.widths.items()
    }
    state = full.state_dict()
    sub = build_model("preresnet18", plan_widths(plan), RATE)
    sub.load_state_dict(slice_state(state, spec, plan), strict=True)
    masked_state = {}
    for key, tensor in state.items():
        flat = flat_positions(tensor.shape, spec.positions(plan).get(key, ())).reshape(-1)
        masked = torch.zeros(tensor.numel(), dtype=tensor.dtype)
        masked[flat] = tensor.reshape(-1)[flat]
        masked_state[key] = masked.view(tensor.shape)
    masked_full = build_model("preresnet18")
    masked_full.load_state_dict(masked_state)
    x = torch.randn(4, 3, 32, 32)
    sub.eval(), masked_full.eval()
    with torch.no_grad():
        torch.testing.assert_close(sub(x), masked_full(x), rtol=1e-4, atol=1e-5)


def test_other_input_channels_and_classes():
    """in_channels and num_classes set the unsplit stem input and classifier output (CIFAR-100, grey images)."""
    model = build_model("preresnet18", None, 1.0, num_classes=100, in_channels=1)
    SplitSpec.from_model(model)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
