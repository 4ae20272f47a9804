"""One round's train replies, checked and fused as they arrive instead of held until the round ends.

A :class:`RoundFold` is opened by :meth:`SubmodelStrategy.configure_train
<msfusion_flwr.server.strategy.SubmodelStrategy.configure_train>` with the
plans it sent, in rank order. Each reply is checked against its node's plan the
moment it is added (:func:`~.replies.check_reply`); the server keeps only its
:class:`~.replies.ReplySummary`. Its update is fused in rank order:

* under a rule that streams (:attr:`~msfusion_flwr.engine.robust.AggregationRule.streams`:
  the weighted mean without capped weights, clipping or screening), it is added
  to running sums (:class:`~msfusion_flwr.engine.fusion.RunningMean`) as soon as
  every lower rank has been resolved (accepted, or left out), then dropped: the
  server holds the model, the sums and the updates that arrived ahead of a
  lower rank, not the round's replies;
* otherwise (median, trimmed mean, clipping, capped weights, screening, or a
  strategy that needs the updates afterwards: FedDF's teachers) the updates are
  held and fused by the strategy at the end.

Fusing in rank order makes a round's result independent of the order replies
arrive in, bit for bit: the same float64 sums as :func:`~msfusion_flwr.engine.fusion.aggregate`
over the rank-ordered updates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import Message

from ..engine.fusion import RunningMean, SubmodelUpdate
from ..engine.groups import IndexPlan, SplitSpec
from ..engine.robust import AggregationRule
from ..protocol import METRICS, WEIGHT_KEY
from .nodes import NodeDirectory
from .replies import ReplySummary, read_reply


def reply_problem(
    reply: Message, expected: Mapping[int, Mapping[str, tuple[tuple[int, ...], str]]], nodes: NodeDirectory, max_examples: float
) -> str | None:
    """Why ``reply`` must be left out, or None: :func:`~.replies.check_reply` against the arrays sent to its node
    (``expected``: node -> name -> shape, dtype) and the partition id the node declared; "not sampled" from any other node."""
    return read_node_reply(reply, expected, nodes, max_examples)[1]


def read_node_reply(
    reply: Message, expected: Mapping[int, Mapping[str, tuple[tuple[int, ...], str]]], nodes: NodeDirectory, max_examples: float
) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """:func:`reply_problem`, and the reply's arrays as tensors when it passes (:func:`~.replies.read_reply`)."""
    node = reply.metadata.src_node_id
    if node not in expected:
        return None, "not sampled"
    profile = nodes.profiles.get(node)
    return read_reply(reply, expected[node], None if profile is None else profile.partition_id, max_examples)


def silence(nodes: NodeDirectory, missing: Sequence[int]) -> list[str]:
    """One line per sampled node that did not reply in time."""
    timeout = "" if nodes.query_timeout is None else f" ({nodes.query_timeout:g} s)"
    return [f"{nodes.describe(n)}: no reply within the round timeout{timeout}" for n in missing]


@dataclass
class RoundFold:
    """A round's replies: checked as they arrive, fused in rank order (module docstring)."""

    server_round: int
    global_state: Mapping[str, torch.Tensor]
    spec: SplitSpec
    plans: Mapping[int, IndexPlan]
    """Node -> the plan sent to it, in rank order."""
    expected: Mapping[int, Mapping[str, tuple[tuple[int, ...], str]]]
    """Node -> the arrays sent to it (name -> shape, dtype), filled as its message is built."""
    nodes: NodeDirectory
    rule: AggregationRule
    calibrate: bool = False
    max_examples: float = math.inf
    hold: bool = False
    """Keep every accepted update (for the strategy to fuse at the end) even where the rule streams."""
    running: RunningMean | None = field(init=False)
    """The running sums, where updates are folded as they come (None: they are held)."""
    held: dict[int, SubmodelUpdate] = field(init=False, default_factory=dict)
    """Accepted updates not folded (yet): node -> update."""
    accepted: dict[int, ReplySummary] = field(init=False, default_factory=dict)
    failures: dict[int, str] = field(init=False, default_factory=dict)
    """Node -> why its reply was left out."""
    repeats: list[str] = field(init=False, default_factory=list)
    """Replies from a node that had replied already (left out)."""
    _next: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        streams = self.rule.streams and not self.hold
        self.running = RunningMean(self.global_state, self.spec, self.calibrate, self.rule) if streams else None
        self._order = list(self.plans)

    def add(self, reply: Message) -> None:
        """Check ``reply``; keep its summary and fuse (or hold) its update if it passes, else record why not."""
        node = reply.metadata.src_node_id
        if node in self.accepted or node in self.failures:
            self.repeats.append(f"{self.nodes.describe(node)}: a second reply in this round")
            return
        state, reason = read_node_reply(reply, self.expected, self.nodes, self.max_examples)
        if state is None:
            self.failures[node] = f"{self.nodes.describe(node)}: {reason}"
        else:
            self.accepted[node] = ReplySummary.of(reply)
            self.held[node] = SubmodelUpdate(self.plans[node], state, float(reply.content[METRICS][WEIGHT_KEY]))
        self._fold_ready()

    def close(self) -> tuple[list[ReplySummary], list[str]]:
        """Fold what is left, in rank order; the accepted replies in rank order, and why others were left out
        (in rank order, then every sampled node that did not reply)."""
        self._fold_ready(every_rank=True)
        missing = [n for n in self._order if n not in self.accepted and n not in self.failures]
        failures = [self.failures[n] for n in sorted(self.failures, key=self.nodes.rank_key)] + self.repeats
        return [self.accepted[n] for n in self._order if n in self.accepted], failures + silence(self.nodes, missing)

    def updates(self) -> dict[int, SubmodelUpdate]:
        """The held updates by node, in rank order (every accepted one where the fold holds them)."""
        return {n: self.held[n] for n in self._order if n in self.held}

    def _fold_ready(self, every_rank: bool = False) -> None:
        """Fold, in rank order, the updates of every rank up to the first unresolved one (``every_rank``: all)."""
        if self.running is None:
            return
        while self._next < len(self._order):
            node = self._order[self._next]
            if not every_rank and node not in self.accepted and node not in self.failures:
                return
            if node in self.held:
                self.running.add(self.held.pop(node))
            self._next += 1
