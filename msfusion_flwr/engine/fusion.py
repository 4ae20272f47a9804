"""Fusing sub-models back into the global model: overlap-aware aggregation.

Every global element becomes the weighted mean of the values the participants
whose slice held it sent back; elements nobody held keep their value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .groups import SplitSpec
from .slicing import flat_positions


@dataclass(frozen=True)
class SubmodelUpdate:
    """A participant's trained sub-model, the plan it was cut with and its weight."""

    plan: Mapping[str, Tensor]
    state: Mapping[str, Tensor]
    weight: float


def aggregate(
    global_state: Mapping[str, Tensor], spec: SplitSpec, updates: Sequence[SubmodelUpdate], calibrate: bool = False
) -> dict[str, Tensor]:
    """Overlap-aware aggregation of sub-models into the global state.

    Every element becomes ``sum_k n_k v_k / sum_k n_k`` over the updates whose
    slice held it; elements held by no update keep their value. Sums run in
    float64 with ``index_add_`` on flat indices (no per-element Python loop).
    With ``calibrate``, each update's output-layer values are first multiplied
    by the fraction of inputs its plan holds (the inverse of
    :func:`~.slicing.slice_state`'s calibration), so every participant's
    contribution is on the full model's scale, whatever its budget.
    """
    positions = [spec.positions(u.plan) for u in updates]
    factors = [spec.calibration(u.plan) if calibrate else {} for u in updates]
    merged = {}
    for key, current in global_state.items():
        numel = current.numel()
        total = torch.zeros(numel, dtype=torch.float64)
        weight = torch.zeros(numel, dtype=torch.float64)
        for update, pos, factor in zip(updates, positions, factors, strict=True):
            flat = flat_positions(current.shape, pos.get(key, ())).reshape(-1)
            values = update.state[key].reshape(-1).to(torch.float64)
            if key in factor:
                values = values * factor[key]
            total.index_add_(0, flat, values * update.weight)
            weight.index_add_(0, flat, torch.full((flat.numel(),), float(update.weight), dtype=torch.float64))
        held = weight > 0
        out = current.reshape(-1).to(torch.float64).clone()
        out[held] = total[held] / weight[held]
        if not current.is_floating_point():
            out = out.round()
        merged[key] = out.view(current.shape).to(current.dtype)
    return merged
