"""Reference-scored aggregation: every update judged against what the server's own data says about the same slice.

FLTrust's idea (Cao et al., NDSS 2021) for overlapping sub-models
(``aggregation-weights = "reference"``). The server holds a small clean,
labeled slice of the training set (``server-data-fraction``). For each
accepted update it trains the very slice that participant was sent, on that
slice of data, with the participants' optimizer settings and cross-entropy
alone (no contrastive term), for as many steps as the participant says it took
(at most the round's median claim): the *reference* delta. Then, per update k with delta d_k and reference r_k
over its floating-point elements:

* its trust is ``max(0, cos(d_k, r_k))``: an update pointing away from what
  clean data says about its own slice gets weight 0, whatever its size or the
  example count it claims;
* its delta is rescaled to the reference's norm, ``d_k * |r_k| / |d_k|``, so a
  scaled update moves the model no further than an honest one of its slice;

and the engine fuses the rescaled updates with the trust scores as weights
(per element over its holders; an element whose holders all have trust 0 keeps
its value). Unlike the median or screening, this does not need honest holders
to outnumber hostile ones on an element: one honest holder with trust > 0 is
enough. It costs the server one participant's training per accepted update on
the server slice, and it assumes that slice is clean and drawn like the
participants' data (with very non-IID participants, honest updates agree with
it less and weigh less).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from logging import INFO

import numpy as np
import torch
from flwr.supercore import log
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import TrainSettings
from ..engine.fusion import SubmodelUpdate
from ..engine.groups import IndexPlan, SplitSpec
from ..engine.policies import IndexPolicy
from ..engine.slicing import plan_widths, slice_state
from ..models.evaluation import token_cross_entropy
from ..models.optimizers import make_optimizer
from .nodes import Budgets
from .replies import ReplySummary
from .strategy import SubmodelStrategy


def reference_seed(seed: int, server_round: int, node: int) -> int:
    """Seed of the reference training for one update, from the run seed, the round and the node."""
    return int(np.random.SeedSequence([seed, server_round, node % 2**32, 0x7257]).generate_state(1)[0])


def trust_and_scale(sent: Mapping[str, Tensor], received: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> tuple[float, float]:
    """(trust, scale) of one update: ``max(0, cos(d, r))`` and ``|r| / |d|`` over the floating-point tensors, where
    d = received - sent and r = reference - sent (scale 0 for a zero delta)."""
    dot = delta_sq = ref_sq = 0.0
    for key, start in sent.items():
        if not start.is_floating_point():
            continue
        d = received[key].to(torch.float64) - start.to(torch.float64)
        r = reference[key].to(torch.float64) - start.to(torch.float64)
        dot += float((d * r).sum())
        delta_sq += float((d * d).sum())
        ref_sq += float((r * r).sum())
    if delta_sq == 0.0 or ref_sq == 0.0:
        return 0.0, 0.0
    return max(0.0, dot / math.sqrt(delta_sq * ref_sq)), math.sqrt(ref_sq / delta_sq)


def rescaled(sent: Mapping[str, Tensor], received: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """``sent + scale * (received - sent)`` for floating-point tensors (in their dtype); other buffers as received."""
    out = {}
    for key, start in sent.items():
        if start.is_floating_point():
            out[key] = (start.to(torch.float64) + scale * (received[key].to(torch.float64) - start.to(torch.float64))).to(start.dtype)
        else:
            out[key] = received[key]
    return out


def steps_claimed(reply: ReplySummary) -> int:
    """The optimizer steps a reply says it took (``train-steps``; 1 when it does not say)."""
    return int(reply.metrics.get("train-steps", 1))


def cycled(dataset: Dataset, count: int, seed: int) -> Subset:
    """``count`` examples of ``dataset``: seeded permutations of it, one after another, cut to ``count``."""
    size = len(dataset)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(size, generator=generator) for _ in range(-(-count // size))])
    return Subset(dataset, order[:count].tolist())


class ReferenceTrust(SubmodelStrategy):
    """Partial training whose updates are weighted by their agreement with a reference trained on server data
    (module docstring)."""

    holds_updates = True  # every update is rescored once the round is complete

    def __init__(
        self,
        spec: SplitSpec,
        policy: IndexPolicy,
        budgets: Budgets,
        make_model: Callable[[Mapping[str, int], float], nn.Module],
        server_set: Dataset,
        local: TrainSettings,
        num_rounds: int,
        **kwargs: float,
    ) -> None:
        super().__init__(spec, policy, budgets, **kwargs)  # type: ignore[arg-type]
        if len(server_set) < 2:  # type: ignore[arg-type]
            raise ValueError(f"reference-scored aggregation needs >= 2 server examples, got {len(server_set)}")  # type: ignore[arg-type]
        self.make_model = make_model
        self.server_set = server_set
        self.local = local
        self.num_rounds = num_rounds
        """The run's length, for the round's learning rate under a schedule (:meth:`TrainSettings.at_round`)."""
        self.last_trust: dict[int, float] = {}
        """Node -> trust of its update in the last round fused (for logs and tests)."""

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└── updates scored against references trained on %d server examples", len(self.server_set))  # type: ignore[arg-type]

    def reference(
        self, server_round: int, node: int, plan: IndexPlan, sent: Mapping[str, Tensor], steps: int
    ) -> dict[str, Tensor]:
        """What an honest participant holding the server's data sends back for the slice ``sent`` (plan ``plan``)
        after ``steps`` optimizer steps with the run's local settings in that round, cross-entropy only (the server's examples
        cycled in a seeded order as often as needed)."""
        seed = reference_seed(self.seed, server_round, node)
        model = self.make_model(plan_widths(plan), self._rates[node])
        model.load_state_dict(sent)
        local = self.local.at_round(server_round, self.num_rounds)
        optimizer = make_optimizer(model, local.optimizer, local.learning_rate, local.momentum, local.weight_decay)
        torch.manual_seed(seed)
        batches = DataLoader(cycled(self.server_set, steps * local.batch_size, seed), batch_size=local.batch_size)
        model.train()
        for x, y in batches:
            if len(y) < 2:  # BatchNorm on batch statistics needs two examples
                continue
            logits, _ = model.outputs(x)  # type: ignore[operator]
            optimizer.zero_grad(set_to_none=True)
            token_cross_entropy(logits, y).backward()
            optimizer.step()
        return {k: v.detach() for k, v in model.state_dict().items()}

    def prepare_updates(
        self, server_round: int, updates: dict[int, SubmodelUpdate], replies: Mapping[int, ReplySummary]
    ) -> dict[int, SubmodelUpdate]:
        """Each update rescaled to its reference's norm and weighted by its trust.

        A reference takes as many steps as the participant says it took
        (``train-steps``), at most the round's median claim, so that its norm
        is that of an honest update of the same length and a participant
        cannot widen its own bound by claiming more.
        """
        claims = [steps_claimed(replies[node]) for node in updates]
        most = int(statistics.median(claims)) if claims else 0
        prepared, self.last_trust = {}, {}
        for (node, update), claim in zip(updates.items(), claims, strict=True):
            sent = slice_state(self._global, self.spec, update.plan, self.calibrate)
            reference = self.reference(server_round, node, update.plan, sent, max(1, min(claim, most)))
            trust, scale = trust_and_scale(sent, update.state, reference)
            self.last_trust[node] = trust
            prepared[node] = SubmodelUpdate(update.plan, rescaled(sent, update.state, scale), trust)
        log(
            INFO,
            "round %d: trust against the server's references: %s",
            server_round, ", ".join(f"{self.nodes.describe(n)} {t:.2f}" for n, t in self.last_trust.items()),
        )  # fmt: skip
        return prepared
