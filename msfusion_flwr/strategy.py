"""Server-side strategies: MSfusion and a metered Flower FedAvg.

``MSFusion`` plans one index window per sampled participant (an index policy
over the splitting engine), sends each one its own message with only its
slices, checks every reply against the plan sent to that node, and fuses the
replies with overlap-aware aggregation. ``MeteredFedAvg`` is Flower's FedAvg,
unchanged, with the same per-round accounting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from .index_policies import DoubleShift
from .protocol import ARRAYS, CONFIG, METRICS, PLAN, encode_plan, message_array_bytes
from .splitting import IndexPlan, SplitSpec, SubmodelUpdate, aggregate, slice_state

WEIGHT_KEY = "num-examples"


@dataclass
class RoundTraffic:
    """What one round cost and who took part."""

    sampled: int = 0
    participants: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    failures: list[str] = field(default_factory=list)
    train_loss: float = math.nan
    started: float = field(default_factory=time.perf_counter)


class TrafficMeter:
    """Per-round participants, array bytes and failures, for any strategy."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundTraffic] = {}

    def sent(self, server_round: int, messages: Sequence[Message]) -> None:
        """Record the train messages of a round."""
        self.rounds[server_round] = RoundTraffic(
            sampled=len(messages), bytes_down=sum(message_array_bytes(m) for m in messages)
        )

    def received(self, server_round: int, accepted: Sequence[Message], failures: Sequence[str]) -> None:
        """Record the accepted replies and the reasons others were left out."""
        traffic = self.rounds.setdefault(server_round, RoundTraffic())
        traffic.bytes_up = sum(message_array_bytes(m) for m in accepted)
        traffic.participants = sorted(int(m.content[METRICS]["partition-id"]) for m in accepted)
        traffic.failures = list(failures)
        weights = [float(m.content[METRICS][WEIGHT_KEY]) for m in accepted]
        losses = [float(m.content[METRICS]["train-loss"]) for m in accepted]
        if weights:
            traffic.train_loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
        for reason in failures:
            log(WARNING, "round %d: left out %s", server_round, reason)


def check_reply(reply: Message, expected_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why ``reply`` must be left out, or None when it matches the plan sent."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        return f"node {node}: error reply ({reply.error.reason})"
    content = reply.content
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        return f"node {node}: reply lacks '{ARRAYS}' or '{METRICS}'"
    arrays, metrics = content.array_records[ARRAYS], content.metric_records[METRICS]
    if set(arrays) != set(expected_shapes):
        return f"node {node}: array names differ from the plan sent"
    for key, array in arrays.items():
        if tuple(array.shape) != tuple(expected_shapes[key]):
            return f"node {node}: {key} has shape {tuple(array.shape)}, expected {expected_shapes[key]}"
        if not torch.isfinite(torch.from_numpy(array.numpy())).all():
            return f"node {node}: {key} has non-finite values"
    count = metrics.get(WEIGHT_KEY)
    if not isinstance(count, int | float) or not count > 0:
        return f"node {node}: {WEIGHT_KEY} must be positive, got {count!r}"
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


class MSFusion(Strategy):
    """MSfusion: double-shifted sub-models and overlap-aware aggregation."""

    def __init__(
        self,
        spec: SplitSpec,
        policy: DoubleShift,
        split_ratio: float,
        fraction_train: float = 1.0,
        min_available_nodes: int = 2,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.policy = policy
        self.split_ratio = split_ratio
        self.fraction_train = fraction_train
        self.min_available_nodes = min_available_nodes
        self.seed = seed
        self.meter = TrafficMeter()
        self.partition_of: dict[int, int] = {}
        self._global: dict[str, torch.Tensor] = {}
        self._plans: dict[int, IndexPlan] = {}
        self._expected: dict[int, dict[str, tuple[int, ...]]] = {}

    def summary(self) -> None:
        log(INFO, "\t├── split ratio %.3f, policy %s", self.split_ratio, self.policy)
        log(INFO, "\t├── width groups %s", self.spec.widths)
        log(INFO, "\t└── fraction-train %.2f, min available nodes %d", self.fraction_train, self.min_available_nodes)

    def _learn_partitions(self, grid: Grid, nodes: Iterable[int]) -> None:
        """Ask nodes not seen before for their partition id (one query each)."""
        unknown = [n for n in nodes if n not in self.partition_of]
        if not unknown:
            return
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for reply in grid.send_and_receive(queries):
            if not reply.has_error() and "profile" in reply.content.config_records:
                profile = reply.content.config_records["profile"]
                self.partition_of[reply.metadata.src_node_id] = int(profile["partition-id"])  # type: ignore[arg-type]

    def sample_participants(self, server_round: int, grid: Grid) -> list[int]:
        """This round's participants, ordered by partition id (their rank).

        A seeded sample of ``int(N * fraction-train)`` (at least one) of the N
        connected nodes, so the same run config samples the same partitions.
        """
        nodes = wait_for_nodes(grid, self.min_available_nodes)
        self._learn_partitions(grid, nodes)
        ordered = sorted(nodes, key=lambda n: (self.partition_of.get(n, math.inf), n))
        size = max(1, int(len(ordered) * self.fraction_train))
        rng = random.Random(f"{self.seed}:{server_round}")
        return [ordered[i] for i in sorted(rng.sample(range(len(ordered)), size))]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per participant, carrying only its slices and its plan."""
        participants = self.sample_participants(server_round, grid)
        self._global = arrays.to_torch_state_dict()
        self._plans, self._expected = {}, {}
        messages = []
        for rank, node in enumerate(participants):
            plan = self.policy.plan(self.spec.widths, self.split_ratio, rank, len(participants), server_round)
            sub_state = slice_state(self._global, self.spec, plan)
            self._plans[node] = plan
            self._expected[node] = {k: tuple(v.shape) for k, v in sub_state.items()}
            train_config = ConfigRecord({**config, "server-round": server_round, "split-rate": self.split_ratio})
            content = RecordDict(
                {ARRAYS: ArrayRecord(sub_state), CONFIG: train_config, PLAN: encode_plan(plan, self.spec.widths)}
            )
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        self.meter.sent(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Overlap-aware aggregation of the replies that match their plans."""
        accepted, failures, replied = [], [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            replied.add(node)
            reason = check_reply(reply, self._expected[node]) if node in self._expected else f"node {node}: not sampled"
            if reason is None:
                accepted.append(reply)
            else:
                failures.append(reason)
        failures += [f"node {n}: no reply" for n in sorted(set(self._expected) - replied)]
        self.meter.received(server_round, accepted, failures)
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
        """No federated evaluation: the server evaluates the full global model."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


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
