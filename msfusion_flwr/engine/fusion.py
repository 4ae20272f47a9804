"""Fusing sub-models back into the global model: overlap-aware aggregation.

Every global element becomes the weighted mean of the values the participants
whose slice held it sent back; elements nobody held keep their value. Robust
rules (:mod:`.robust`) reweight, clip and replace the mean by an order
statistic over the same holders.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .groups import SplitSpec
from .robust import AggregationRule, clip_factors, holder_statistic
from .slicing import flat_positions

PLAIN = AggregationRule()
"""Plain overlap-aware averaging: every holder's value weighted by its example count."""


@dataclass(frozen=True)
class SubmodelUpdate:
    """A participant's trained sub-model, the plan it was cut with and its weight."""

    plan: Mapping[str, Tensor]
    state: Mapping[str, Tensor]
    weight: float


def aggregate(
    global_state: Mapping[str, Tensor],
    spec: SplitSpec,
    updates: Sequence[SubmodelUpdate],
    calibrate: bool = False,
    rule: AggregationRule = PLAIN,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Overlap-aware aggregation of sub-models into the global state.

    With the default ``rule``, every element becomes ``sum_k n_k v_k / sum_k
    n_k`` over the updates whose slice held it; elements held by no update keep
    their value. Sums run in float64 with ``index_add_`` on flat indices (no
    per-element Python loop), one tensor at a time. With ``calibrate``, each
    update's output-layer values are first multiplied by the fraction of inputs
    its plan holds (the inverse of :func:`~.slicing.slice_state`'s
    calibration), so every participant's contribution is on the full model's
    scale, whatever its budget. Any other :class:`~.robust.AggregationRule`
    reweights the updates, clips their deltas and/or replaces the mean by an
    order statistic over the holders (:mod:`.robust`); its ``noise_std`` draws
    Gaussian noise from ``generator``.
    """
    held = _Holders(global_state, spec, updates, calibrate)
    weights = rule.weights([u.weight for u in updates])
    factors = held.clip_factors(rule.clip)
    merged = {}
    for key, current in global_state.items():
        if rule.noise_std > 0 and not current.is_floating_point():
            merged[key] = current.clone()  # counters would tell the participants' batch counts
            continue
        contributions = held.values(key, factors)
        if rule.statistic == "mean":
            total, weight = _weighted_sums(current.numel(), contributions, weights)
            out = _mean_of_sums(current, total, weight, rule.noise_std, generator)
        else:
            out = _order_statistic(current, contributions, rule)
        merged[key] = _as_global(current, out)
    return merged


class RunningMean:
    """:func:`aggregate` one update at a time, for a rule that :attr:`~.robust.AggregationRule.streams`.

    Per tensor it keeps the weighted sum of the holders' values and the sum of
    their weights (float64, four times the model's float32 bytes), so an update
    can be dropped as soon as it is added: the memory is the model's, not the
    round's replies'. Adding the updates in the order :func:`aggregate` is
    given them yields its result bit for bit: the same float64 operations in
    the same order.
    """

    def __init__(
        self, global_state: Mapping[str, Tensor], spec: SplitSpec, calibrate: bool = False, rule: AggregationRule = PLAIN
    ) -> None:
        if not rule.streams:
            raise ValueError(f"{rule} needs every update at once: it cannot be folded one at a time")
        self.global_state, self.spec, self.calibrate, self.rule = global_state, spec, calibrate, rule
        self.count = 0
        self._sums = {
            key: (torch.zeros(current.numel(), dtype=torch.float64), torch.zeros(current.numel(), dtype=torch.float64))
            for key, current in global_state.items()
            if _sums_kept(current, rule)
        }

    def add(self, update: SubmodelUpdate) -> None:
        """Fold one update into the sums."""
        held = _Holders(self.global_state, self.spec, [update], self.calibrate)
        (w,) = self.rule.weights([update.weight])
        for key, (total, weight) in self._sums.items():
            _fold(total, weight, *held.values(key, [1.0])[0], w)
        self.count += 1

    def result(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The fused global state (elements no update held keep their value), once: noise, drawn as
        :func:`aggregate` draws it, is added to the sums."""
        merged = {}
        for key, current in self.global_state.items():
            if key not in self._sums:
                merged[key] = current.clone()
                continue
            total, weight = self._sums[key]
            merged[key] = _as_global(current, _mean_of_sums(current, total, weight, self.rule.noise_std, generator))
        return merged


def _sums_kept(current: Tensor, rule: AggregationRule) -> bool:
    """Whether the fused value of ``current`` is a mean over its holders (not: integer buffers under noise)."""
    return not (rule.noise_std > 0 and not current.is_floating_point())


def _as_global(current: Tensor, out: Tensor) -> Tensor:
    """A fused flat float64 tensor in ``current``'s shape and dtype (integer buffers rounded)."""
    if not current.is_floating_point():
        out = out.round()
    return out.view(current.shape).to(current.dtype)


def aggregate_screened(
    global_state: Mapping[str, Tensor],
    spec: SplitSpec,
    updates: Sequence[SubmodelUpdate],
    calibrate: bool = False,
    rule: AggregationRule = PLAIN,
) -> tuple[dict[str, Tensor], list[int]]:
    """:func:`aggregate` of the updates that agree with the others; (state, indices left out).

    Update k is left out when its delta points away from the other holders'
    (cosine <= 0 with their consensus on the elements it shares with them,
    :func:`agreement`), one at a time: the update that disagrees most goes
    first and the rest are scored again without it, since a hostile update
    also drags the consensus the honest ones are compared with. The rule then
    fuses the rest (at least one update is kept).
    """
    plain = dataclasses.replace(rule, screen=False)
    kept = list(range(len(updates)))
    while len(kept) > 1:
        scores = agreement(global_state, spec, [updates[k] for k in kept], calibrate, plain)
        worst = min(range(len(kept)), key=scores.__getitem__)
        if scores[worst] > 0:
            break
        del kept[worst]  # the others' consensus changes without it: score again
    dropped = [k for k in range(len(updates)) if k not in kept]
    return aggregate(global_state, spec, [updates[k] for k in kept], calibrate, plain), dropped


def agreement(
    global_state: Mapping[str, Tensor],
    spec: SplitSpec,
    updates: Sequence[SubmodelUpdate],
    calibrate: bool = False,
    rule: AggregationRule = PLAIN,
) -> list[float]:
    """Per update, the cosine between its delta and the other updates' consensus on the elements it shares with them.

    Deltas are from ``global_state``, clipped as ``rule`` clips them; the
    consensus on an element is the mean of the other holders' deltas, weighted
    by ``rule``'s weights (leave-one-out: an update never agrees with itself,
    which matters in partial training, where many of its elements have no
    other holder). The cosine runs over the elements it shares with at least
    two others where there are such elements, else with at least one: where
    only two participants hold an element, each is the other's whole consensus
    and an honest update facing a hostile one would look as hostile as it.
    Floating-point tensors only; 0 for an update that shares no element with
    another or has a zero delta.
    """
    held = _Holders(global_state, spec, updates, calibrate)
    weights = rule.weights([u.weight for u in updates])
    factors = held.clip_factors(rule.clip)
    # sums[m][k] = (dot, own, reference) of update k over the elements it shares with at least m + 1 others
    sums = [[[0.0, 0.0, 0.0] for _ in updates] for _ in range(2)]
    for key, current in global_state.items():
        if not current.is_floating_point():
            continue
        base = current.reshape(-1).to(torch.float64)
        deltas = [(flat, values - base[flat]) for flat, values in held.values(key, factors)]
        total, weight = _weighted_sums(current.numel(), deltas, weights)
        holders = torch.zeros(current.numel(), dtype=torch.long)
        for flat, _ in deltas:
            holders.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.long))
        for k, ((flat, delta), w) in enumerate(zip(deltas, weights, strict=True)):
            others = holders[flat] - 1
            for m in range(2):
                shared = others > m
                toward = (total[flat][shared] - w * delta[shared]) / (weight[flat][shared] - w)
                mine = delta[shared]
                acc = sums[m][k]
                acc[0] += float(mine @ toward)
                acc[1] += float(mine @ mine)
                acc[2] += float(toward @ toward)
    scores = []
    for k in range(len(updates)):
        dot, a, b = sums[1][k] if sums[1][k][1] > 0 and sums[1][k][2] > 0 else sums[0][k]
        scores.append(dot / math.sqrt(a * b) if a > 0 and b > 0 else 0.0)
    return scores


class _Holders:
    """Per tensor, where every update's values sit in the global tensor and what they are, on the global scale."""

    def __init__(
        self, global_state: Mapping[str, Tensor], spec: SplitSpec, updates: Sequence[SubmodelUpdate], calibrate: bool
    ) -> None:
        self.global_state = global_state
        self.updates = updates
        self.positions = [spec.positions(u.plan) for u in updates]
        self.factors = [spec.calibration(u.plan) if calibrate else {} for u in updates]

    def _one(self, key: str, k: int) -> tuple[Tensor, Tensor]:
        current = self.global_state[key]
        flat = flat_positions(current.shape, self.positions[k].get(key, ())).reshape(-1)
        values = self.updates[k].state[key].reshape(-1).to(torch.float64)
        if key in self.factors[k]:
            values = values * self.factors[k][key]
        return flat, values

    def values(self, key: str, clip: Sequence[float]) -> list[tuple[Tensor, Tensor]]:
        """(flat positions, values) of every update for ``key``; deltas of floating tensors scaled by ``clip``."""
        current = self.global_state[key]
        base = current.reshape(-1).to(torch.float64) if current.is_floating_point() and any(f != 1.0 for f in clip) else None
        out = []
        for k, factor in enumerate(clip):
            flat, values = self._one(key, k)
            if factor != 1.0 and base is not None:
                start = base[flat]
                values = start + factor * (values - start)
            out.append((flat, values))
        return out

    def clip_factors(self, clip: float) -> list[float]:
        """Per update, the factor its delta is scaled by (:func:`~.robust.clip_factors`; all 1 with ``clip = 0``)."""
        return clip_factors(*self.delta_norms(), clip) if clip > 0 else [1.0] * len(self.updates)

    def delta_norms(self) -> tuple[list[float], list[int]]:
        """Per update, the squared L2 norm of its delta over its floating-point elements, and their number."""
        norms, sizes = [0.0] * len(self.updates), [0] * len(self.updates)
        for key, current in self.global_state.items():
            if not current.is_floating_point():
                continue
            base = current.reshape(-1).to(torch.float64)
            for k in range(len(self.updates)):
                flat, values = self._one(key, k)
                norms[k] += float((values - base[flat]).square().sum())
                sizes[k] += flat.numel()
        return norms, sizes


def _weighted_sums(
    numel: int, held: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Per element of a flat tensor of ``numel``: the weighted sum of the holders' values, and of their weights."""
    total = torch.zeros(numel, dtype=torch.float64)
    weight = torch.zeros(numel, dtype=torch.float64)
    for (flat, values), w in zip(held, weights, strict=True):
        _fold(total, weight, flat, values, w)
    return total, weight


def _fold(total: Tensor, weight: Tensor, flat: Tensor, values: Tensor, w: float) -> None:
    """Add one holder's weighted values and its weight at its flat positions."""
    total.index_add_(0, flat, values * w)
    weight.index_add_(0, flat, torch.full((flat.numel(),), float(w), dtype=torch.float64))


def _mean_of_sums(
    current: Tensor, total: Tensor, weight: Tensor, noise_std: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Per element, the holders' weighted mean (noise added to the sum first); ``current`` where nobody held it."""
    numel = current.numel()
    if noise_std > 0:
        total += noise_std * torch.randn(numel, generator=generator, dtype=torch.float64)
    any_held = weight > 0
    out = current.reshape(-1).to(torch.float64).clone()
    out[any_held] = total[any_held] / weight[any_held]
    return out


ORDER_CHUNK = 2**24
"""Most (participants x elements) float64 entries an order statistic sorts at once (128 MiB)."""


def _order_statistic(current: Tensor, held: Sequence[tuple[Tensor, Tensor]], rule: AggregationRule) -> Tensor:
    """:func:`~.robust.holder_statistic` of every element, in chunks of elements so memory stays bounded."""
    numel = current.numel()
    out = current.reshape(-1).to(torch.float64).clone()
    if not held:
        return out
    ordered = []
    for flat, values in held:
        order = torch.argsort(flat)
        ordered.append((flat[order], values[order]))
    step = max(1, ORDER_CHUNK // len(held))
    for start in range(0, numel, step):
        stop = min(numel, start + step)
        dense = torch.full((len(held), stop - start), math.nan, dtype=torch.float64)
        for row, (flat, values) in enumerate(ordered):
            lo, hi = torch.searchsorted(flat, torch.tensor([start, stop])).tolist()
            dense[row, flat[lo:hi] - start] = values[lo:hi]
        statistic, any_held = holder_statistic(dense, rule.statistic, rule.trim_fraction)
        chunk = out[start:stop]
        chunk[any_held] = statistic[any_held]
    return out
