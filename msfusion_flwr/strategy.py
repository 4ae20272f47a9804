"""Server-side strategies: partial training over the splitting engine, and metered FedAvg.

``SubmodelStrategy`` runs every partial-training method (MSfusion and the
baselines differ only in their index policy): it plans one sub-model per
sampled participant at that participant's budget, sends each one its own
message with only its slices, checks every reply against the plan sent to that
node, and fuses the replies with overlap-aware aggregation.
``EnsembleDistillation`` (FedDF) then distils the participants' ensemble into
the fused model on unlabeled server data. ``MeteredFedAvg`` is Flower's FedAvg,
unchanged, with the same per-round accounting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log
from torch import nn
from torch.utils.data import Dataset

from .distillation import DistillSettings, ensemble_distillation, unlabeled_inputs
from .index_policies import IndexPolicy, PlanRequest
from .protocol import ARRAYS, CONFIG, METRICS, PLAN, encode_plan, message_array_bytes
from .splitting import IndexPlan, SplitSpec, SubmodelUpdate, aggregate, plan_widths, slice_state

WEIGHT_KEY = "num-examples"


COST_METRICS = {
    "trained-params": "trained_params",
    "train-flops": "flops",
    "peak-memory-bytes": "peak_memory_bytes",
    "train-time-s": "train_time_s",
}
"""ClientApp metric -> metrics.jsonl name of the measured per-participant costs."""


@dataclass
class RoundTraffic:
    """What one round cost and who took part.

    ``costs`` holds one dict per accepted participant: ``partition_id``,
    ``bytes_down``, ``bytes_up`` and the measured training costs (COST_METRICS).
    ``server_costs`` holds the server's own training cost in the round (FedDF's
    distillation: ``distill_time_s``, ``distill_flops``; empty for other methods).
    """

    sampled: int = 0
    participants: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    failures: list[str] = field(default_factory=list)
    train_loss: float = math.nan
    costs: list[dict[str, float]] = field(default_factory=list)
    server_costs: dict[str, float] = field(default_factory=dict)
    sent_bytes: dict[int, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


def participant_cost(reply: Message, bytes_down: int) -> dict[str, float]:
    """One accepted participant's measured cost in this round."""
    metrics = reply.content[METRICS]
    cost = {"partition_id": int(metrics["partition-id"]), "bytes_down": bytes_down, "bytes_up": message_array_bytes(reply)}
    for metric, name in COST_METRICS.items():
        cost[name] = float(metrics[metric]) if metric in metrics else math.nan
    return cost


class TrafficMeter:
    """Per-round participants, array bytes, measured costs and failures, for any strategy."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundTraffic] = {}

    def sent(self, server_round: int, messages: Sequence[Message]) -> None:
        """Record the train messages of a round."""
        sent_bytes = {m.metadata.dst_node_id: message_array_bytes(m) for m in messages}
        self.rounds[server_round] = RoundTraffic(
            sampled=len(messages), bytes_down=sum(sent_bytes.values()), sent_bytes=sent_bytes
        )

    def received(self, server_round: int, accepted: Sequence[Message], failures: Sequence[str]) -> None:
        """Record the accepted replies and the reasons others were left out."""
        traffic = self.rounds.setdefault(server_round, RoundTraffic())
        traffic.costs = sorted(
            (participant_cost(m, traffic.sent_bytes.get(m.metadata.src_node_id, 0)) for m in accepted),
            key=lambda c: c["partition_id"],
        )
        traffic.bytes_up = sum(int(c["bytes_up"]) for c in traffic.costs)
        traffic.participants = [int(c["partition_id"]) for c in traffic.costs]
        traffic.failures = list(failures)
        weights = [float(m.content[METRICS][WEIGHT_KEY]) for m in accepted]
        losses = [float(m.content[METRICS]["train-loss"]) for m in accepted]
        if weights:
            traffic.train_loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
        for reason in failures:
            log(WARNING, "round %d: left out %s", server_round, reason)


def check_reply(reply: Message, expected: Mapping[str, tuple[tuple[int, ...], str]]) -> str | None:
    """Why ``reply`` must be left out, or None when it matches the plan sent.

    ``expected``: array name -> (shape, numpy dtype name) of what was sent.
    """
    if reply.has_error():
        return f"error reply ({reply.error.reason})"
    content = reply.content
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        return f"reply lacks '{ARRAYS}' or '{METRICS}'"
    arrays, metrics = content.array_records[ARRAYS], content.metric_records[METRICS]
    if set(arrays) != set(expected):
        return "array names differ from the plan sent"
    for key, array in arrays.items():
        shape, dtype = expected[key]
        if tuple(array.shape) != shape:
            return f"{key} has shape {tuple(array.shape)}, expected {shape}"
        if str(array.dtype) != dtype:
            return f"{key} has dtype {array.dtype}, expected {dtype}"
        if not torch.isfinite(torch.from_numpy(array.numpy())).all():
            return f"{key} has non-finite values"
    count = metrics.get(WEIGHT_KEY)
    if not isinstance(count, int | float) or not count > 0:
        return f"{WEIGHT_KEY} must be positive, got {count!r}"
    return None


def training_metrics(replies: Sequence[Message]) -> MetricRecord:
    """Example-weighted mean of the replies' training metrics (partition ids left out)."""
    records = [
        RecordDict({METRICS: MetricRecord({k: v for k, v in r.content[METRICS].items() if k != "partition-id"})})
        for r in replies
    ]
    return aggregate_metricrecords(records, WEIGHT_KEY)


def wait_for_nodes(grid: Grid, minimum: int, poll_s: float = 1.0) -> list[int]:
    """Connected node ids, once at least ``minimum`` are connected."""
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), minimum)
        time.sleep(poll_s)
    return nodes


@dataclass(frozen=True)
class NodeProfile:
    """What a node tells about itself when queried (from its node config)."""

    partition_id: int
    split_ratio: float | None = None


@dataclass(frozen=True)
class Budgets:
    """Each participant's split ratio r.

    A node's own ``split-ratio`` (node config) wins; else ``by_partition``
    cycles over partition ids (the ``budgets`` run-config list); else ``default``.
    """

    default: float
    by_partition: tuple[float, ...] = ()

    def ratio(self, profile: NodeProfile) -> float:
        if profile.split_ratio is not None:
            return profile.split_ratio
        if self.by_partition:
            return self.by_partition[profile.partition_id % len(self.by_partition)]
        return self.default


class SubmodelStrategy(Strategy):
    """Partial training over the splitting engine: one index policy per method.

    Each round: sample participants (seeded), rank them by partition id, ask
    the policy for each one's plan at its budget, send each one only its
    slices, check every reply against its plan, and fuse the accepted replies
    with overlap-aware aggregation.
    """

    def __init__(
        self,
        spec: SplitSpec,
        policy: IndexPolicy,
        budgets: Budgets,
        fraction_train: float = 1.0,
        min_available_nodes: int = 2,
        seed: int = 0,
        query_timeout: float | None = None,
    ) -> None:
        self.spec = spec
        self.policy = policy
        self.budgets = budgets
        self.fraction_train = fraction_train
        self.min_available_nodes = min_available_nodes
        self.seed = seed
        self.query_timeout = query_timeout
        self.meter = TrafficMeter()
        self.profiles: dict[int, NodeProfile] = {}
        self._global: dict[str, torch.Tensor] = {}
        self._plans: dict[int, IndexPlan] = {}
        self._rates: dict[int, float] = {}
        self._expected: dict[int, dict[str, tuple[tuple[int, ...], str]]] = {}
        self._accepted: list[Message] = []

    def summary(self) -> None:
        log(INFO, "\t├── policy %s, budgets %s", self.policy, self.budgets)
        log(INFO, "\t├── width groups %s", self.spec.widths)
        log(INFO, "\t└── fraction-train %.2f, min available nodes %d", self.fraction_train, self.min_available_nodes)

    def _learn_profiles(self, grid: Grid, nodes: Iterable[int]) -> None:
        """Ask nodes not seen before for their profile (one query each)."""
        unknown = [n for n in nodes if n not in self.profiles]
        if not unknown:
            return
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for reply in grid.send_and_receive(queries, timeout=self.query_timeout):
            if not reply.has_error() and "profile" in reply.content.config_records:
                profile = reply.content.config_records["profile"]
                ratio = profile.get("split-ratio")
                self.profiles[reply.metadata.src_node_id] = NodeProfile(
                    int(profile["partition-id"]),  # type: ignore[arg-type]
                    None if ratio is None else float(ratio),  # type: ignore[arg-type]
                )

    def profile(self, node: int) -> NodeProfile:
        """A node's profile; nodes that did not answer rank last, by node id."""
        return self.profiles.get(node, NodeProfile(partition_id=node % 2**31))

    def describe(self, node: int) -> str:
        """A node as the log names it: its partition id when known, and its node id."""
        if node in self.profiles:
            return f"partition {self.profiles[node].partition_id} (node {node})"
        return f"node {node}"

    def rank_key(self, node: int) -> tuple[bool, int, int]:
        """Order of nodes: by partition id; nodes that did not answer the query last, by node id."""
        return (node not in self.profiles, self.profile(node).partition_id, node)

    def sample_participants(self, server_round: int, grid: Grid) -> list[int]:
        """This round's participants, ordered by partition id (their rank).

        A seeded sample of ``int(N * fraction-train)`` (at least one) of the N
        connected nodes, so the same run config samples the same partitions.
        """
        nodes = wait_for_nodes(grid, self.min_available_nodes)
        self._learn_profiles(grid, nodes)
        ordered = sorted(nodes, key=self.rank_key)
        size = max(1, int(len(ordered) * self.fraction_train))
        rng = random.Random(f"{self.seed}:{server_round}")
        return [ordered[i] for i in sorted(rng.sample(range(len(ordered)), size))]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per participant, carrying only its slices and its plan."""
        participants = self.sample_participants(server_round, grid)
        self._global = arrays.to_torch_state_dict()
        self._plans, self._rates, self._expected = {}, {}, {}
        messages = []
        for rank, node in enumerate(participants):
            profile = self.profile(node)
            request = PlanRequest(
                widths=self.spec.widths,
                ratio=self.budgets.ratio(profile),
                rank=rank,
                num_participants=len(participants),
                server_round=server_round,
                partition_id=profile.partition_id,
                seed=self.seed,
            )
            assignment = self.policy.assign(request)
            sub_state = slice_state(self._global, self.spec, assignment.plan)
            self._plans[node] = assignment.plan
            self._rates[node] = assignment.rate
            self._expected[node] = {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in sub_state.items()}
            train_config = ConfigRecord({**config, "server-round": server_round, "split-rate": assignment.rate})
            content = RecordDict(
                {
                    ARRAYS: ArrayRecord(sub_state),
                    CONFIG: train_config,
                    PLAN: encode_plan(assignment.plan, self.spec.widths),
                }
            )
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        self.meter.sent(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Overlap-aware aggregation of the replies that match their plans (kept in ``_accepted``).

        Replies are taken in rank order, not arrival order, so the float sums
        (and the run) are reproducible.
        """
        accepted, failures, replied = [], [], set()
        for reply in sorted(replies, key=lambda r: self.rank_key(r.metadata.src_node_id)):
            node = reply.metadata.src_node_id
            replied.add(node)
            reason = check_reply(reply, self._expected[node]) if node in self._expected else "not sampled"
            if reason is None:
                accepted.append(reply)
            else:
                failures.append(f"{self.describe(node)}: {reason}")
        missing = sorted(set(self._expected) - replied, key=self.rank_key)
        failures += [f"{self.describe(n)}: no reply within the round timeout" for n in missing]
        self.meter.received(server_round, accepted, failures)
        self._accepted = accepted
        if not accepted:
            return None, None
        updates = [
            SubmodelUpdate(
                plan=self._plans[r.metadata.src_node_id],
                state=r.content[ARRAYS].to_torch_state_dict(),
                weight=float(r.content[METRICS][WEIGHT_KEY]),
            )
            for r in accepted
        ]
        merged = aggregate(self._global, self.spec, updates)
        return ArrayRecord(merged), training_metrics(accepted)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates the global model."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def distillation_seed(seed: int, server_round: int) -> int:
    """Seed of a round's distillation batches, from the run seed and the round."""
    return int(np.random.SeedSequence([seed, server_round, 0xD157]).generate_state(1)[0])


class EnsembleDistillation(SubmodelStrategy):
    """FedDF: the partial-training round, then ensemble distillation on unlabeled server data.

    After :meth:`SubmodelStrategy.aggregate_train` has fused the accepted
    replies (overlap-aware aggregation: FedAvg for equal widths, HeteroFL's
    fusion otherwise), every accepted participant's model is rebuilt at its
    plan widths and rate and their averaged logits on the server set teach the
    fused full-width model (see :mod:`msfusion_flwr.distillation`). Only the
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

    def teachers(self, replies: Sequence[Message]) -> list[nn.Module]:
        """Every reply's model at its own plan widths and rate."""
        models = []
        for reply in replies:
            node = reply.metadata.src_node_id
            model = self.make_model(plan_widths(self._plans[node]), self._rates[node])
            model.load_state_dict(reply.content[ARRAYS].to_torch_state_dict())
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


class MeteredFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, plus per-round traffic accounting."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(fraction_evaluate=0.0, **kwargs)  # type: ignore[arg-type]
        self.meter = TrafficMeter()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.meter.sent(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted = [r for r in replies if not r.has_error()]
        failures = [f"node {r.metadata.src_node_id}: error reply ({r.error.reason})" for r in replies if r.has_error()]
        self.meter.received(server_round, accepted, failures)
        return super().aggregate_train(server_round, replies)
