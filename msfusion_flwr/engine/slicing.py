"""Cutting a global state dict down to one participant's sub-model.

Given a :class:`~msfusion_flwr.engine.groups.SplitSpec` and an index plan (the
units of every group a participant holds), :func:`slice_state` indexes every
split tensor down to those units: the real, smaller tensors a narrow instance
of the same architecture loads. :func:`flat_positions` gives, for one tensor,
where each element of its slice sits in the flattened full tensor (what fusion
scatters into).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .groups import SplitSpec


def plan_widths(plan: Mapping[str, Tensor]) -> dict[str, int]:
    """Width of each group in a plan's sub-model."""
    return {name: int(idx.numel()) for name, idx in plan.items()}


def slice_state(
    state: Mapping[str, Tensor], spec: SplitSpec, plan: Mapping[str, Tensor], calibrate: bool = False
) -> dict[str, Tensor]:
    """The sub-model's state: every split tensor indexed down to the plan's units.

    With ``calibrate``, output-layer weights are divided by the fraction of
    their inputs the plan holds (:meth:`~.groups.SplitSpec.calibration`): the
    slice computes its outputs at the scale the full model's have.
    """
    positions = spec.positions(plan)
    factors = spec.calibration(plan) if calibrate else {}
    sub = {}
    for key, tensor in state.items():
        for dim, pos in positions.get(key, ()):
            tensor = tensor.index_select(dim, pos)
        if key in factors:
            tensor = tensor / factors[key]
        sub[key] = tensor.contiguous()
    return sub


def flat_positions(shape: Sequence[int], dim_positions: Sequence[tuple[int, Tensor]]) -> Tensor:
    """Flat (row-major) indices into a tensor of ``shape`` of its sliced elements.

    The result has the sub-tensor's shape: element ``e`` of the slice sits at
    ``flat[e]`` of the flattened full tensor.
    """
    per_dim = [torch.arange(n) for n in shape]
    for dim, pos in dim_positions:
        per_dim[dim] = pos
    strides = torch.ones(len(shape), dtype=torch.long)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    flat = torch.zeros((), dtype=torch.long)
    for d, idx in enumerate(per_dim):
        view = [1] * len(shape)
        view[d] = -1
        flat = flat + idx.view(view) * strides[d]
    return flat
