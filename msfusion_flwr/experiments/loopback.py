"""Drive the strategy and the ClientApp handlers in one process, without Flower's engine.

``LoopbackGrid`` stands in for a Flower ``Grid``: it knows a set of node
contexts and answers query messages with the real ``participant.query``
handler. Scripts that measure one participant's cost and tests that inspect
exactly what a participant receives use it; runs use Flower's engines.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Context, Message, RecordDict
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
