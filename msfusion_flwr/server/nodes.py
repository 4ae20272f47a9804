"""Which nodes take part and how they rank: waiting for nodes, their profiles, their budgets.

A node's *profile* is what it tells about itself when queried once (its
partition id, its rank among a round's participants, the number of partitions,
and optionally its own split-ratio budget). Nodes that did not answer rank
last, by node id.

Waiting for nodes is bounded (``node-wait-timeout``): in simulation every node
registers at start, so after a short wait the count is final; in deployment
devices may join late, and the key says how long to wait for them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from ..protocol import decode_profile


class NodesUnavailable(RuntimeError):
    """Fewer than ``min-available-nodes`` nodes connected within ``node-wait-timeout``; the message says what to do."""


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float = math.inf, poll_s: float = 1.0) -> list[int]:
    """Connected node ids, once at least ``minimum`` are connected.

    Raises :class:`NodesUnavailable` (one line: the count, the minimum and the
    ways out) when ``timeout_s`` seconds pass first. Logs the count every 10 s.
    """
    start = time.monotonic()
    last_log = -math.inf
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise NodesUnavailable(
                f"only {len(nodes)} node(s) connected after {timeout_s:g} s, min-available-nodes is {minimum}: "
                f"lower min-available-nodes to at most {len(nodes)}, or start more nodes (simulation: raise "
                f"num-supernodes in --federation-config; deployment: start more SuperNodes, or raise "
                f"node-wait-timeout if they join late)"
            )
        if waited - last_log >= 10.0:
            log(INFO, "Waiting for nodes: %d connected, %d needed (giving up after %g s, node-wait-timeout)", len(nodes), minimum, timeout_s)
            last_log = waited
        time.sleep(min(poll_s, max(timeout_s - waited, 0.0)))
    return nodes


@dataclass(frozen=True)
class NodeProfile:
    """What a node tells about itself when queried (from its node config)."""

    partition_id: int
    split_ratio: float | None = None
    num_partitions: int | None = None


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


@dataclass
class NodeDirectory:
    """The profiles of the nodes seen so far, learned with one query per new node."""

    query_timeout: float | None = None
    profiles: dict[int, NodeProfile] = field(default_factory=dict)

    def learn(self, grid: Grid, nodes: Iterable[int]) -> None:
        """Ask nodes not seen before for their profile (one query each)."""
        unknown = [n for n in nodes if n not in self.profiles]
        if not unknown:
            return
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for reply in grid.send_and_receive(queries, timeout=self.query_timeout):
            profile = None if reply.has_error() else decode_profile(reply.content)
            if profile is not None:
                self.profiles[reply.metadata.src_node_id] = NodeProfile(*profile)
        silent = [n for n in unknown if n not in self.profiles]
        if silent:
            log(
                WARNING,
                "%d of %d new node(s) did not answer the profile query within %s s (round-timeout): they rank last, "
                "by node id, at the run config's budget; check their logs (node config partition-id and num-partitions)",
                len(silent), len(unknown), "no limit" if self.query_timeout is None else f"{self.query_timeout:g}",
            )  # fmt: skip

    def num_partitions(self) -> set[int]:
        """The numbers of partitions the known nodes report (one value in a consistent federation)."""
        return {p.num_partitions for p in self.profiles.values() if p.num_partitions is not None}

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
