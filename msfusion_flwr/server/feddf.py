"""FedDF's strategy: the partial-training round, then ensemble distillation into the fused model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.supercore import log
from torch import nn
from torch.utils.data import Dataset

from ..config import DistillSettings
from ..engine.fusion import SubmodelUpdate
from ..engine.groups import SplitSpec
from ..engine.policies import IndexPolicy
from ..engine.slicing import plan_widths
from .distillation import ensemble_distillation, unlabeled_inputs
from .nodes import Budgets
from .strategy import SubmodelStrategy


def distillation_seed(seed: int, server_round: int) -> int:
    """Seed of a round's distillation batches, from the run seed and the round."""
    return int(np.random.SeedSequence([seed, server_round, 0xD157]).generate_state(1)[0])


class EnsembleDistillation(SubmodelStrategy):
    """FedDF: the partial-training round, then ensemble distillation on unlabeled server data.

    After :meth:`SubmodelStrategy.aggregate_train` has fused the accepted
    replies (overlap-aware aggregation: FedAvg for equal widths, HeteroFL's
    fusion otherwise), every accepted participant's model is rebuilt at its
    plan widths and rate and their averaged logits on the server set teach the
    fused full-width model (see :mod:`.distillation`). Only the
    server set's inputs are kept; its labels are dropped on construction.
    """

    def __init__(
        self,
        spec: SplitSpec,
        policy: IndexPolicy,
        budgets: Budgets,
        make_model: Callable[[Mapping[str, int], float], nn.Module],
        server_set: Dataset,
        distill: DistillSettings = DistillSettings(),
        **kwargs: float,
    ) -> None:
        super().__init__(spec, policy, budgets, **kwargs)  # type: ignore[arg-type]
        self.make_model = make_model
        self.server_inputs = unlabeled_inputs(server_set)
        if len(self.server_inputs) < 2:
            raise ValueError(f"ensemble distillation needs >= 2 server examples, got {len(self.server_inputs)}")
        self.distill = distill

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└── ensemble distillation on %d server examples: %s", len(self.server_inputs), self.distill)

    holds_updates = True  # the teachers are the round's accepted updates

    def teachers(self, updates: Mapping[int, SubmodelUpdate]) -> list[nn.Module]:
        """Every accepted update's model (node -> update) at its own plan widths and rate."""
        models = []
        for node, update in updates.items():
            model = self.make_model(plan_widths(update.plan), self._rates[node])
            model.load_state_dict(update.state)
            models.append(model)
        return models

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Overlap-aware aggregation, then distillation of the accepted replies' ensemble into it."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        student = self.make_model(dict(self.spec.widths), 1.0)
        student.load_state_dict(arrays.to_torch_state_dict())
        generator = torch.Generator().manual_seed(distillation_seed(self.seed, server_round))
        cost = ensemble_distillation(student, self.teachers(self._accepted), self.server_inputs, self.distill, generator)
        traffic = self.meter.rounds[server_round]
        traffic.server_costs = {"distill_time_s": cost["distill-time-s"], "distill_flops": cost["distill-flops"]}
        log(
            INFO,
            "round %d: distilled %d teachers, KL %.4f -> %.4f (first/last batch), %.1f s",
            server_round, len(self._accepted), cost["distill-loss-first"], cost["distill-loss-last"], cost["distill-time-s"],
        )  # fmt: skip
        merged = MetricRecord({**(metrics or {}), **cost})
        return ArrayRecord(student.state_dict()), merged
