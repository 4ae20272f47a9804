"""Index policies: which units of each width group a participant holds in a round.

A policy maps (round, participant rank, participants, split ratio) to an
:data:`~msfusion_flwr.splitting.IndexPlan`. Every method is a policy over the
same splitting engine; MSfusion's is double shifting with adaptive overlap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .splitting import IndexPlan


def window_length(ratio: float, width: int) -> int:
    """Units a participant of split ratio ``ratio`` holds in a group of ``width``.

    ``w = max(1, round(r * K))`` with Python's round (half to even).
    """
    return max(1, round(ratio * width))


def rolling_window(start: int, length: int, width: int) -> torch.Tensor:
    """``{start, start + 1, ..., start + length - 1} mod width``, ascending.

    Ascending order keeps the sub-model's units in global order, so a window of
    the full width is exactly the full model (not a permutation of it).
    """
    return torch.sort((start + torch.arange(length)) % width).values


@dataclass(frozen=True)
class DoubleShift:
    """MSfusion's double shifting.

    Participant of rank ``j`` among ``M`` in round ``t`` starts its window at
    ``s = (floor(j * K / M) + (t - 1) * d) mod K`` (``overlap = "auto"``), or at
    ``s = (floor(j * (1 - x) * w) + (t - 1) * d) mod K`` for a fixed overlap
    fraction ``x``. ``d`` is the round shift step in units (0 disables it).
    """

    shift_step: int = 1
    overlap: float | str = "auto"

    def participant_offset(self, rank: int, num_participants: int, width: int, length: int) -> int:
        """The inter-participant shift of rank ``rank``, in units."""
        if self.overlap == "auto":
            return (rank * width) // num_participants
        spacing = (1.0 - float(self.overlap)) * length
        return math.floor(rank * spacing + 1e-9)

    def plan(
        self,
        widths: Mapping[str, int],
        ratio: float,
        rank: int,
        num_participants: int,
        server_round: int,
    ) -> IndexPlan:
        """The index plan of one participant for one round (round is 1-based)."""
        plan = {}
        for name, width in widths.items():
            length = window_length(ratio, width)
            offset = self.participant_offset(rank, num_participants, width, length)
            start = (offset + (server_round - 1) * self.shift_step) % width
            plan[name] = rolling_window(start, length, width)
        return plan
