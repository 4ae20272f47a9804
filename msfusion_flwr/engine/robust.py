"""Robust overlap-aware aggregation: what fusion does with weights, outsized updates and outliers.

An :class:`AggregationRule` is a policy over :func:`~.fusion.aggregate`; the
default (``mean`` of every holder's value weighted by its example count, no
clipping) is plain overlap-aware averaging. Its three parts act in order:

1. **weights** (``aggregation-weights``): a reply's claimed example count
   (``examples``), the count capped at ``weight-cap`` times the round's median
   claim (medians here average the middle two of an even number) (``capped``: one participant cannot outweigh ``weight-cap`` honest
   ones), or 1 for everybody (``equal``), or, with ``reference``, each update's
   agreement with a reference update the server trains on its own data
   (:mod:`msfusion_flwr.server.trust`, which also rescales the deltas);
2. **update clipping** (``clip-updates`` = c > 0): each participant's delta
   (what it sent minus the slice it was sent, over all its floating-point
   elements) is scaled down to at most c times the round's median RMS delta, a
   bound proportional to the square root of its slice's size, so a scaled
   update moves the model no further than an honest one of its size;
3. **the statistic per element over the participants that held it**
   (``aggregation``): the weighted ``mean``, or the coordinate-wise ``median``
   or ``trimmed-mean`` (``trim-fraction`` β of the holders dropped at each end,
   ``floor(β h)`` of h holders), both unweighted like Flower's FedMedian and
   FedTrimmedAvg.

With ``screen`` (``screen-updates``), every update is first judged as a
whole against the others: left out when its (clipped) delta points away from
the other holders' weighted mean delta on the elements it shares with them
(cosine <= 0, leave-one-out; the worst first, then the others scored again
without it); the rule then fuses the rest
(:func:`~.fusion.aggregate_screened`). Where a statistic over two or three
holders cannot outvote one hostile value (partial training: most elements have
few holders), a whole update can still be judged on all of its shared
elements. It needs honest updates to outnumber hostile ones among each
update's co-holders, and very non-IID honest updates can be left out too.

For differential privacy (:mod:`msfusion_flwr.server.privacy`) the rule also
carries ``noise_std``: Gaussian noise of that std is added to every held
element's sum over its holders before the division by their (equal) weights,
so an element held by h participants gets noise of std ``noise_std / h``;
integer buffers (BatchNorm's batch counters, which count a participant's
batches) then keep their global value.

Elements held by too few participants for a statistic to exclude anyone fall
back by its definition: the median of two holders is their mean, of one its
value; a trimmed mean that trims ``floor(β h) = 0`` holders is their
unweighted mean. Elements nobody held keep their value, as with the mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

STATISTICS = ("mean", "median", "trimmed-mean")
"""Per-element statistics over holders (``aggregation``)."""
WEIGHTINGS = ("examples", "capped", "equal", "reference")
"""How a reply's example count weights it (``aggregation-weights``); ``reference``: not at all, the server
weights each update by its agreement with a reference it trains itself (:mod:`msfusion_flwr.server.trust`)."""


@dataclass(frozen=True)
class AggregationRule:
    """How fusion combines the holders of every element (module docstring)."""

    statistic: str = "mean"
    trim_fraction: float = 0.2
    weighting: str = "examples"
    weight_cap: float = 2.0
    clip: float = 0.0
    noise_std: float = 0.0
    screen: bool = False

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"aggregation must be one of {STATISTICS}, not {self.statistic!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"aggregation-weights must be one of {WEIGHTINGS}, not {self.weighting!r}")
        if self.noise_std > 0 and (self.statistic != "mean" or self.screen):
            raise ValueError("noise is calibrated to a sum: it needs aggregation 'mean' and no screening")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim-fraction must be in [0, 0.5), not {self.trim_fraction}")

    @property
    def plain(self) -> bool:
        """True for plain overlap-aware averaging (example-weighted mean, no clipping)."""
        return self.statistic == "mean" and self.weighting == "examples" and self.clip == 0 and self.noise_std == 0 and not self.screen

    @property
    def streams(self) -> bool:
        """True when updates can be fused one at a time (:class:`~.fusion.RunningMean`): a mean whose weights
        and deltas do not depend on the round's other updates (no capped weights, no clipping, no screening)."""
        return self.statistic == "mean" and self.weighting in ("examples", "equal") and self.clip == 0 and not self.screen

    def weights(self, claims: Sequence[float]) -> list[float]:
        """The fusion weight of each reply, from the example counts the replies claim (``reference``: the
        updates' weights as given, the trust scores the strategy put there)."""
        if self.weighting == "equal":
            return [1.0] * len(claims)
        if self.weighting == "capped" and claims:
            cap = self.weight_cap * statistics.median(float(c) for c in claims)
            return [min(float(c), cap) for c in claims]
        return [float(c) for c in claims]


def clip_factors(squared_norms: Sequence[float], sizes: Sequence[int], clip: float) -> list[float]:
    """Per update, the factor (<= 1) that scales its delta to at most ``clip`` times the median RMS delta.

    ``squared_norms[k]`` is the squared L2 norm of update k's delta over its
    ``sizes[k]`` floating-point elements. With ``clip = 0`` every factor is 1.
    """
    if clip <= 0 or not squared_norms:
        return [1.0] * len(squared_norms)
    rms = [math.sqrt(s / n) if n else 0.0 for s, n in zip(squared_norms, sizes, strict=True)]
    bound = clip * statistics.median(rms)
    return [1.0 if r <= bound else bound / r for r in rms]


def holder_statistic(values: Tensor, statistic: str, trim_fraction: float) -> tuple[Tensor, Tensor]:
    """The median or trimmed mean of every column of ``values`` over its non-NaN entries.

    ``values`` is (participants, elements), NaN where a participant did not
    hold the element. Returns (statistic per element, held by anyone); the
    statistic is 0 where nobody held the element. Vectorized: one sort along
    the participants, then gathers and a cumulative sum.
    """
    held = ~torch.isnan(values)
    holders = held.sum(dim=0)
    ordered = torch.where(held, values, torch.inf).sort(dim=0).values  # holders' values first, ascending
    any_held = holders > 0
    if statistic == "median":
        lower = ((holders - 1).clamp(min=0) // 2).unsqueeze(0)
        upper = (holders // 2).clamp(max=values.shape[0] - 1).unsqueeze(0)
        result = (ordered.gather(0, lower) + ordered.gather(0, upper)).squeeze(0) / 2
    elif statistic == "trimmed-mean":
        trimmed = torch.floor(holders.to(torch.float64) * trim_fraction).to(torch.long)
        finite = torch.where(torch.isinf(ordered), 0.0, ordered)
        cumulative = torch.cat([torch.zeros_like(finite[:1]), finite.cumsum(dim=0)])
        top = cumulative.gather(0, (holders - trimmed).unsqueeze(0)).squeeze(0)
        bottom = cumulative.gather(0, trimmed.unsqueeze(0)).squeeze(0)
        result = (top - bottom) / (holders - 2 * trimmed).clamp(min=1)
    else:
        raise ValueError(f"no order statistic {statistic!r}")
    return torch.where(any_held, result, 0.0), any_held
