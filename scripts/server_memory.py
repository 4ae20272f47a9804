"""The server's peak memory and time per round with many participants, without training anybody.

Runs the real strategy (``make_strategy``) through the real round loop
(``server.rounds.run_rounds``) against a Grid stand-in whose participants
answer at once with the slice they were sent plus noise (honest, well-formed
replies): what is left is the server's own work (planning, slicing, checking,
fusing) and its memory. Replies arrive ``--per-pull`` at a time, one batch per
pull, in the order ``--arrival`` says: ``rank`` (the order the messages were
pushed, as Flower's simulation engine roughly answers them), ``random`` (a
seeded shuffle, as real devices of different speeds might) or ``reverse`` (the
worst case for a fold that fuses in rank order: every update waits for rank
0); a revision whose round loop uses ``send_and_receive`` gets them all in one
list, as Flower's Grid returns them. ``--in-flight N`` sends the messages in
waves (``messages-in-flight``): a message pushed later is answered after those
pushed before it.

    .venv/bin/python scripts/server_memory.py --participants 100
    .venv/bin/python scripts/server_memory.py --participants 100 --in-flight 8
    PYTHONPATH=/path/to/older/checkout .venv/bin/python scripts/server_memory.py --participants 100   # before

Prints one line: participants, model, split ratio, rounds, seconds per round
(all of it, the stand-in's replies included), the seconds per round spent in
the strategy's own methods (planning and slicing in ``configure_train``,
checking and fusing in ``receive_train`` and ``aggregate_train``: the server's
work), peak RSS of the process (MiB; ``ru_maxrss``, so run each configuration
in its own process) and the RSS before the first round.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from msfusion_flwr.config import RunConfig
from msfusion_flwr.engine import SplitSpec
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.models import build_model
from msfusion_flwr.protocol import ARRAYS, METRICS, client_config
from msfusion_flwr.server.methods import make_strategy
from msfusion_flwr.server.rounds import run_rounds


def rss_mib() -> float:
    """The process's resident set now (MiB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def answer(message: Message, rng: np.random.Generator) -> Message:
    """An honest reply: the slice sent, plus noise, with well-formed metrics."""
    sent = message.content.array_records[ARRAYS]
    arrays = {k: Array((a.numpy() + rng.normal(0, 0.01, a.shape)).astype(a.numpy().dtype)) for k, a in sent.items()}
    metrics = {"num-examples": 60, "train-loss": 1.0, "partition-id": message.metadata.dst_node_id}
    return Message(RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord(metrics)}), reply_to=message)


class AnsweringGrid(LoopbackGrid):
    """Loopback nodes (partition id = node id) that answer train messages at once; queries as LoopbackGrid."""

    def __init__(self, num_nodes: int, per_pull: int, arrival: str) -> None:
        super().__init__(num_nodes)
        self.per_pull, self.arrival = per_pull, arrival
        self.rng = np.random.default_rng(0)
        self.pushed: list[Message] = []

    def send_and_receive(self, messages, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if messages and messages[0].metadata.message_type != "train":
            return super().send_and_receive(messages, timeout)
        return [answer(m, self.rng) for m in messages]

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        batch = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        if self.arrival == "reverse":
            batch.reverse()
        elif self.arrival == "random":
            self.rng.shuffle(batch)
        for message in batch:
            message.metadata.__dict__["_message_id"] = f"m{message.metadata.dst_node_id}"
        self.pushed += batch  # answered after the messages pushed before them (a push in waves queues behind)
        return [m.metadata.message_id for m in batch]

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        batch, self.pushed = self.pushed[: self.per_pull], self.pushed[self.per_pull :]
        return [answer(m, self.rng) for m in batch]


def timed(strategy: object, names: tuple[str, ...]) -> list[float]:
    """Wrap the strategy's methods ``names`` (those it has) so that their wall time adds up in the list returned."""
    spent = [0.0]
    for name in names:
        method = getattr(strategy, name, None)
        if method is None:
            continue

        def wrapper(*args, _method=method, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(strategy, name, wrapper)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=100)
    parser.add_argument("--model", default="preresnet18")
    parser.add_argument("--split-ratio", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-pull", type=int, default=4)
    parser.add_argument("--method", default="msfusion")
    parser.add_argument("--arrival", choices=("rank", "random", "reverse"), default="rank")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a shared machine)")
    parser.add_argument("--in-flight", type=int, default=0, help="messages-in-flight (0: every message at once)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RunConfig.from_mapping(
        {"method": args.method, "model": args.model, "split-ratio": args.split_ratio, "min-available-nodes": args.participants}
    )
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10, in_channels=3) if args.model == "preresnet18" else build_model(args.model)
    strategy = make_strategy(config, SplitSpec.from_model(model))
    arrays = ArrayRecord(strategy.initial_state(model.state_dict()))
    del model
    grid = AnsweringGrid(args.participants, args.per_pull, args.arrival)
    spent = timed(strategy, ("configure_train", "receive_train", "aggregate_train"))
    before = rss_mib()
    start = time.perf_counter()
    run_rounds(strategy, grid, arrays, args.rounds, timeout=3600.0, train_config=client_config(config), messages_in_flight=args.in_flight)
    per_round = (time.perf_counter() - start) / args.rounds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    failures = sum(len(t.failures) for t in strategy.meter.rounds.values())
    print(
        f"participants {args.participants}, {args.model} at r = {args.split_ratio:g}, {args.rounds} rounds, "
        f"{args.arrival} arrival, {args.in_flight or 'all'} in flight: "
        f"{per_round:.2f} s per round ({spent[0] / args.rounds:.2f} s in the strategy), peak RSS {peak:.0f} MiB (before round 1: {before:.0f} MiB), failures {failures}"
    )


if __name__ == "__main__":
    main()
