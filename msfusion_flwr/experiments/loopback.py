"""Drive the strategy and the ClientApp in one process, without Flower's engine.

``LoopbackGrid`` stands in for a Flower ``Grid``: it knows a set of node
contexts and answers query messages with the real ``participant.query``
handler. Scripts that measure one participant's cost and tests that inspect
exactly what a participant receives use it.

``InProcessGrid`` and :func:`run_in_process` run a whole federation through the
app's own ServerApp and ClientApp, every message handed to its node's ClientApp
in node order: deterministic, and without Ray's start-up (seconds per run on two
cores). Tests whose subject is not the engine, and ``scripts/check_behaviour.py``,
use them; the comparison harness and the user's runs use Flower's engines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from ..device import participant


def set_task_identity() -> None:
    """Give messages built outside a Flower run the identity Flower requires of them."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@dataclass
class LoopbackGrid:
    """A Grid stand-in over in-process node contexts (partition id = node id)."""

    num_nodes: int
    contexts: dict[int, Context] = field(init=False)

    def __post_init__(self) -> None:
        set_task_identity()
        self.contexts = {
            n: Context(
                run_id=1,
                node_id=n,
                node_config={"partition-id": n, "num-partitions": self.num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for n in range(self.num_nodes)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        """Answer query messages (train messages are handled by the caller)."""
        return [participant.query(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


class InProcessGrid:
    """A Grid stand-in: every message goes to its node's ClientApp, in node order, in this process.

    Nodes are 1..n with partition ids 0..n-1; a ClientApp that raises answers
    with an error reply, as Flower's engines do. Pushed messages are answered
    when pulled, in node order.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        set_task_identity()
        self.client_app = client_app
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                state=RecordDict(), run_config={},
            )
            for node in range(1, num_nodes + 1)
        }  # fmt: skip
        self.pushed: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Keep the messages to answer when pulled; their ids (given as Flower's Grid gives them)."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.pushed[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to the pushed messages named, answered now, in node order."""
        return self.send_and_receive([self.pushed.pop(i) for i in message_ids if i in self.pushed])

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            try:
                replies.append(self.client_app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as exc:  # noqa: BLE001 (a failing participant: an error reply, as Flower sends)
                replies.append(Message(error=Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message))
        return replies


def run_in_process(
    config: Mapping[str, Any] | None = None, num_supernodes: int = 10, client_app: ClientApp | None = None
) -> Path:
    """:func:`~msfusion_flwr.apps.run_experiment` without Ray: the same ServerApp and ClientApp, driven by
    :class:`InProcessGrid`; returns the output directory."""
    from ..apps import check_node_count, make_client_app, make_server_app, server_config

    run = server_config({}, config)
    check_node_count(run, num_supernodes)
    run = run.with_outputs(output_dir=str(Path(run.outputs.output_dir).resolve()))
    grid = InProcessGrid(client_app or make_client_app(), num_supernodes)
    server = make_server_app(run.to_dict())
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return Path(run.outputs.output_dir)
