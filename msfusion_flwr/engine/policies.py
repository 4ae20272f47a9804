"""Index policies: which units of each width group a participant holds in a round.

A policy turns a :class:`PlanRequest` (round, the participant's rank among this
round's M participants, its split-ratio budget r, ...) into an
:class:`Assignment`: an index plan over the splitting engine and the width
ratio the participant trains at (its Scaler's rate). Every partial-training
method is one policy over the same engine:

* ``msfusion``: :class:`DoubleShift`, windows spread across participants and
  rolling across rounds, with adaptive or fixed overlap; or, with
  ``window-layout = "blocks"``, :class:`BlockShift`, the same double shifting
  over disjoint blocks of units, so the fused model is an ensemble of narrow
  models rather than a sum of windows trained apart;
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


class BudgetError(ValueError):
    """A participant's budget is below what the policy must give it (a run-config mistake, not a bug)."""


def block_count(ratio: float, widths: Mapping[str, int]) -> int:
    """How many disjoint blocks of ``window_length(ratio, K)`` units every group holds: ``min_g floor(K_g / w_g)``.

    One count for all groups, so block ``b`` of every group is one narrow
    network; a group whose width is not a multiple of its block length leaves
    its last units outside every block.
    """
    return min(k // window_length(ratio, k) for k in widths.values())


@dataclass(frozen=True)
class BlockShift:
    """Double shifting over disjoint blocks: rank ``j`` in round ``t`` holds block ``(j + (t - 1) d) mod B``.

    Every group of width ``K`` is cut into ``B = block_count(ratio, widths)``
    blocks of ``w = window_length(ratio, K)`` consecutive units, at the run's
    smallest budget ``ratio``. The blocks spread across the round's
    participants (``inter_participant``; ``False``: everyone holds block
    ``(t - 1) d mod B``) and roll across rounds by ``d = shift_step`` blocks.
    A weight between two blocks is never held, so a global model that starts
    with those weights at zero (:meth:`support`) stays block-diagonal: the
    fused model is the ensemble of the B narrow models (their logits averaged
    under calibrated output scaling), each trained by the participants that
    held its block, and no unit ever sums windows trained apart. It is exactly
    the ensemble where normalisation is per unit (the image models' static
    BatchNorm); a LayerNorm over a split width normalises all blocks together.
    A participant holds ``ratio`` of the full model's width whatever its own
    budget, which must not be smaller.

    ``blocks`` > 0 is the number of blocks of a global model that is itself
    ``blocks`` blocks wide (``server.methods.global_widths``: ``blocks`` x the
    block length per group): fewer block models, each trained by more
    participants; every group of width K then holds blocks of K / ``blocks``
    units, and ``blocks = 1`` is ``fedavg-small``'s narrow model.

    ``shared`` groups are not cut: the global model holds them at one block's
    length (``server.methods.global_widths``) and every participant holds them
    whole, so the B block models branch off one narrow trunk that every
    participant trains, and the weights from the trunk into each block are held
    by that block's participants.
    """

    ratio: float
    shift_step: int = 1
    inter_participant: bool = True
    blocks: int = 0
    shared: frozenset[str] = frozenset()

    def count(self, widths: Mapping[str, int]) -> int:
        """How many blocks the global model of group widths ``widths`` holds."""
        return self.blocks or block_count(self.ratio, {g: k for g, k in widths.items() if g not in self.shared})

    def block_length(self, width: int) -> int:
        """Units per block in a group of global width ``width``."""
        return width // self.blocks if self.blocks else window_length(self.ratio, width)

    def block_plan(self, widths: Mapping[str, int], block: int) -> IndexPlan:
        """The units of block ``block`` in every group, and every unit of the shared groups."""
        plan = {}
        for name, k in widths.items():
            if name in self.shared:
                plan[name] = torch.arange(k)
                continue
            length = self.block_length(k)
            plan[name] = torch.arange(block * length, (block + 1) * length)
        return plan

    def support(self, widths: Mapping[str, int]) -> list[IndexPlan]:
        """Every plan this policy can assign: one per block."""
        return [self.block_plan(widths, b) for b in range(self.count(widths))]

    def assign(self, request: PlanRequest) -> Assignment:
        if request.ratio < self.ratio - 1e-12:
            raise BudgetError(
                f"window-layout 'blocks' cuts blocks at split ratio {self.ratio}, but partition "
                f"{request.partition_id} has a budget of {request.ratio}: list it in 'budgets' so blocks are cut at it"
            )
        count = self.count(request.widths)
        offset = request.rank if self.inter_participant else 0
        block = (offset + (request.server_round - 1) * self.shift_step) % count
        return Assignment(self.block_plan(request.widths, block), self.scaler_rate)

    @property
    def scaler_rate(self) -> float:
        """The rate a block's narrow model is built at (its HeteroFL Scalers divide by it while training).

        1 without shared groups: every unit of a block reads only its own
        block's units, in the fused model as in training (the weights between
        blocks are zero), so a Scaler's premise, that the full model sums over
        1/r times more inputs than the slice, does not hold, and dividing by r
        would train each block as a function the fused model never computes
        (for the language models, whose Scalers sit on residual branches
        without a norm after them). With shared groups, a shared unit that
        reads a cut group does sum over every block in the fused model, so the
        block's share of the width is kept.
        """
        if not self.shared:
            return 1.0
        return 1.0 / self.blocks if self.blocks else self.ratio


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
