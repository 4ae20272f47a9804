"""What each round cost and who took part: per-round traffic, measured costs and failures, for any strategy."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Message
from flwr.supercore import log

from ..engine.groups import IndexPlan
from ..protocol import WEIGHT_KEY, message_array_bytes
from .replies import ReplySummary

COST_METRICS = {
    "trained-params": "trained_params",
    "train-flops": "flops",
    "peak-memory-bytes": "peak_memory_bytes",
    "train-time-s": "train_time_s",
    "handler-time-s": "handler_time_s",
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
    plans: list[IndexPlan] | None = None
    """The accepted participants' index plans (None: full-model replies, Flower's FedAvg)."""
    screened: list[int] = field(default_factory=list)
    """Partition ids of accepted replies that screening (``screen-updates``) left out of the aggregate."""
    sent_bytes: dict[int, int] = field(default_factory=dict)
    server_s: float = 0.0
    """Seconds in the strategy's train methods: planning, slicing, checking, fusing (not the waiting)."""
    started: float = field(default_factory=time.perf_counter)


def participant_cost(reply: ReplySummary, bytes_down: int) -> dict[str, float]:
    """One accepted participant's measured cost in this round."""
    metrics = reply.metrics
    cost = {"partition_id": int(metrics["partition-id"]), "bytes_down": bytes_down, "bytes_up": reply.bytes_up}
    for metric, name in COST_METRICS.items():
        cost[name] = float(metrics[metric]) if metric in metrics else math.nan
    return cost


class TrafficMeter:
    """Per-round participants, array bytes, measured costs and failures, for any strategy."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundTraffic] = {}

    def sent(self, server_round: int, messages: Sequence[Message]) -> None:
        """Record the train messages of a round."""
        self.opened(server_round, sampled=len(messages))
        for message in messages:
            self.sent_one(server_round, message)

    def opened(self, server_round: int, sampled: int) -> None:
        """Start a round's record: ``sampled`` participants, no message sent yet."""
        self.rounds[server_round] = RoundTraffic(sampled=sampled)

    def sent_one(self, server_round: int, message: Message) -> None:
        """Record one train message of an opened round, as it is built (a round may send its messages in waves)."""
        traffic = self.rounds[server_round]
        sent = message_array_bytes(message)
        traffic.sent_bytes[message.metadata.dst_node_id] = sent
        traffic.bytes_down += sent

    def server_work(self, server_round: int, seconds: float) -> None:
        """Record the seconds the strategy's train methods took in a round (:func:`~.rounds.run_rounds`)."""
        self.rounds.setdefault(server_round, RoundTraffic()).server_s = seconds

    def received(self, server_round: int, accepted: Sequence[ReplySummary], failures: Sequence[str]) -> None:
        """Record the accepted replies and the reasons others were left out."""
        traffic = self.rounds.setdefault(server_round, RoundTraffic())
        traffic.costs = sorted(
            (participant_cost(m, traffic.sent_bytes.get(m.node, 0)) for m in accepted),
            key=lambda c: c["partition_id"],
        )
        traffic.bytes_up = sum(int(c["bytes_up"]) for c in traffic.costs)
        traffic.participants = [int(c["partition_id"]) for c in traffic.costs]
        traffic.failures = list(failures)
        weights = [float(m.metrics[WEIGHT_KEY]) for m in accepted]
        losses = [float(m.metrics["train-loss"]) for m in accepted]
        if weights:
            traffic.train_loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
        for reason in failures:
            log(WARNING, "round %d: left out %s", server_round, reason)
