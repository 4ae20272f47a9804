"""Index policies: which units of each width group a participant holds in a round.

A policy turns a :class:`PlanRequest` (round, the participant's rank among this
round's M participants, its split-ratio budget r, ...) into an
:class:`Assignment`: an index plan over the splitting engine and the width
ratio the participant trains at (its Scaler's rate). Every partial-training
method is one policy over the same engine:

* ``msfusion``: :class:`DoubleShift`, windows spread across participants and
  rolling across rounds, with adaptive or fixed overlap;
* ``heterofl``: :class:`StaticPrefix`, the first w units of every group;
* ``fedrolex``: :class:`RollingWindow`, one window for all participants,
  starting at ``(-(t - 1)) mod K``;
* ``fd``: :class:`RandomSubset`, a fresh random subset per participant and round;
* ``fjord``: :class:`OrderedDropout`, the first w units with the width drawn per
  participant and round from a uniform grid capped by the budget;
* ``fedavg-small``: :class:`FullWidth` over a global model that is itself narrow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .groups import IndexPlan


@dataclass(frozen=True)
class PlanRequest:
    """What a policy may use to plan one participant's sub-model for one round."""

    widths: Mapping[str, int]
    ratio: float
    rank: int
    num_participants: int
    server_round: int
    partition_id: int = 0
    seed: int = 0


@dataclass(frozen=True)
class Assignment:
    """A participant's index plan and the width ratio it trains at."""

    plan: IndexPlan
    rate: float


class IndexPolicy(Protocol):
    """Maps a plan request to an assignment; deterministic given the request."""

    def assign(self, request: PlanRequest) -> Assignment: ...


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


def prefix(length: int) -> torch.Tensor:
    """The first ``length`` units."""
    return torch.arange(length)


def request_rng(request: PlanRequest) -> np.random.Generator:
    """A generator seeded by (run seed, round, partition id): reproducible, independent."""
    return np.random.default_rng([request.seed, request.server_round, request.partition_id])


@dataclass(frozen=True)
class DoubleShift:
    """MSfusion's double shifting.

    Participant of rank ``j`` among ``M`` in round ``t`` starts its window at
    ``s = (floor(j * K / M) + (t - 1) * d) mod K`` (``overlap = "auto"``), or at
    ``s = (floor(j * (1 - x) * w) + (t - 1) * d) mod K`` for a fixed overlap
    fraction ``x``. ``d`` is the round shift step in units (0 disables it);
    ``inter_participant = False`` drops the first term (an ablation).
    """

    shift_step: int = 1
    overlap: float | str = "auto"
    inter_participant: bool = True

    def participant_offset(self, rank: int, num_participants: int, width: int, length: int) -> int:
        """The inter-participant shift of rank ``rank``, in units."""
        if not self.inter_participant:
            return 0
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

    def assign(self, request: PlanRequest) -> Assignment:
        plan = self.plan(request.widths, request.ratio, request.rank, request.num_participants, request.server_round)
        return Assignment(plan, request.ratio)


@dataclass(frozen=True)
class StaticPrefix:
    """HeteroFL: the first ``w = max(1, round(r K))`` units of every group, every round."""

    def assign(self, request: PlanRequest) -> Assignment:
        plan = {name: prefix(window_length(request.ratio, k)) for name, k in request.widths.items()}
        return Assignment(plan, request.ratio)


@dataclass(frozen=True)
class RollingWindow:
    """FedRolex: every participant's window starts at ``(-(t - 1)) mod K`` in round ``t``."""

    def assign(self, request: PlanRequest) -> Assignment:
        plan = {}
        for name, k in request.widths.items():
            start = (-(request.server_round - 1)) % k
            plan[name] = rolling_window(start, window_length(request.ratio, k), k)
        return Assignment(plan, request.ratio)


@dataclass(frozen=True)
class RandomSubset:
    """Federated Dropout: ``w`` units drawn uniformly without replacement, per participant and round."""

    def assign(self, request: PlanRequest) -> Assignment:
        rng = request_rng(request)
        plan = {}
        for name, k in request.widths.items():
            chosen = rng.choice(k, size=window_length(request.ratio, k), replace=False)
            plan[name] = torch.from_numpy(np.sort(chosen)).long()
        return Assignment(plan, request.ratio)


@dataclass(frozen=True)
class OrderedDropout:
    """FjORD: the first ``w`` units, the width ratio p drawn per participant and round.

    p is uniform over the grid ``{i / levels : i = 1..levels}`` restricted to
    ``p <= r`` (the device's budget); if no grid point fits, p = r.
    """

    levels: int = 8

    def width_ratio(self, request: PlanRequest) -> float:
        """The drawn width ratio p of this participant in this round."""
        grid = [i / self.levels for i in range(1, self.levels + 1) if i / self.levels <= request.ratio + 1e-12]
        if not grid:
            return request.ratio
        return float(grid[request_rng(request).integers(len(grid))])

    def assign(self, request: PlanRequest) -> Assignment:
        p = self.width_ratio(request)
        plan = {name: prefix(window_length(p, k)) for name, k in request.widths.items()}
        return Assignment(plan, p)


@dataclass(frozen=True)
class FullWidth:
    """Every unit of the (possibly narrow) global model: FedAvg through the engine."""

    def assign(self, request: PlanRequest) -> Assignment:
        return Assignment({name: prefix(k) for name, k in request.widths.items()}, 1.0)
