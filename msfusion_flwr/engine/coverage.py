"""Coverage: which elements of the global model partial training has reached, per round and so far.

An element of a global tensor is *trained* in a round when at least one
accepted participant's slice held it. A weight joining unit i of one width
group to unit j of another is trained only in a round where one participant
holds both, so coverage of the tensors between groups grows slowly under
rolling windows. :class:`Coverage` keeps one boolean mask per floating-point
tensor and, every round, marks the union of the accepted plans' slices
(vectorised: :func:`~.slicing.flat_positions` per plan and tensor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .groups import SplitSpec
from .slicing import flat_positions


@dataclass(frozen=True)
class CoverageRound:
    """One round's coverage: fractions of elements trained in the round and so far.

    ``model`` and ``model_round`` are element-weighted over every
    floating-point tensor, ``split`` over the split tensors only;
    ``by_tensor`` maps each split tensor to ``(this round, so far)``.
    """

    model: float
    model_round: float
    split: float
    by_tensor: dict[str, tuple[float, float]]


def held_masks(spec: SplitSpec, shapes: Mapping[str, torch.Size], plans: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The elements of every tensor that at least one of ``plans`` holds (flat boolean masks); unsplit tensors are held whole."""
    masks = {k: torch.zeros(shape.numel(), dtype=torch.bool) for k, shape in shapes.items()}
    for plan in plans:
        positions = spec.positions(plan)
        for key, shape in shapes.items():
            if key in positions:
                masks[key][flat_positions(shape, positions[key]).reshape(-1)] = True
            else:
                masks[key][:] = True
    return masks


def zero_outside(state: Mapping[str, Tensor], spec: SplitSpec, plans: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """``state`` with every floating-point element that none of ``plans`` holds set to zero.

    A policy whose plans never cover some elements (the weights between
    :class:`~.policies.BlockShift`'s blocks) starts its global model with them
    at zero, so they never add untrained values to the fused model.
    """
    shapes = {k: v.shape for k, v in state.items() if v.is_floating_point()}
    masks = held_masks(spec, shapes, plans)
    return {k: v * masks[k].reshape(v.shape).to(v.dtype) if k in masks else v for k, v in state.items()}


class Coverage:
    """Masks of the elements trained so far, updated with each round's accepted plans."""

    def __init__(self, spec: SplitSpec, state: Mapping[str, Tensor]) -> None:
        self.spec = spec
        self.shapes = {k: v.shape for k, v in state.items() if v.is_floating_point()}
        self.split = [k for k in self.shapes if k in spec.positions(spec.full_plan())]
        self.ever = {k: torch.zeros(shape.numel(), dtype=torch.bool) for k, shape in self.shapes.items()}

    def held(self, plans: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The elements of every tensor that at least one of ``plans`` holds (flat boolean masks)."""
        return held_masks(self.spec, self.shapes, plans)

    def update(self, plans: Sequence[Mapping[str, Tensor]]) -> CoverageRound:
        """Mark this round's accepted plans; the round's and the cumulative fractions."""
        now = self.held(plans)
        for key, mask in now.items():
            self.ever[key] |= mask
        total = sum(shape.numel() for shape in self.shapes.values())
        split_total = sum(self.shapes[k].numel() for k in self.split)

        def fraction(masks: Mapping[str, Tensor], keys: Sequence[str], denominator: int) -> float:
            return sum(int(masks[k].sum()) for k in keys) / denominator if denominator else 1.0

        return CoverageRound(
            model=fraction(self.ever, list(self.shapes), total),
            model_round=fraction(now, list(self.shapes), total),
            split=fraction(self.ever, self.split, split_total),
            by_tensor={
                k: (float(now[k].float().mean()), float(self.ever[k].float().mean())) for k in self.split
            },
        )

    def state(self) -> dict[str, Tensor]:
        """The cumulative masks (for checkpoints)."""
        return {k: v.clone() for k, v in self.ever.items()}

    def load(self, masks: Mapping[str, Tensor]) -> None:
        """Restore cumulative masks saved with :meth:`state`."""
        for key, mask in masks.items():
            if key in self.ever:
                self.ever[key] = mask.clone().to(torch.bool)
