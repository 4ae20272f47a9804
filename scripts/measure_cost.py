"""Measure what one participant receives and how long it trains, sub-model vs full model.

For split ratio r (default 0.25) and for r = 1 (the full model), this builds the
real train messages with the MSfusion strategy (``configure_train``) and runs
the real ClientApp handler (``participant.train``) on one participant's data,
for several rounds so that the contrastive loss (which needs the previous
round's sub-model) is included: MSfusion as the paper reads it (``MSFUSION_PAPER``,
rolling windows over the full model; its default blocks do not fit r = 1). It prints the array bytes received per round
and the median local training time, and their ratios.

    .venv/bin/python scripts/measure_cost.py --split-ratio 0.25 --rounds 3

Timing runs with one torch thread (one CPU per participant, as in the
simulation); other load on the machine inflates both timings alike.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from flwr.app import ArrayRecord

from msfusion_flwr.config import MSFUSION_PAPER, RunConfig
from msfusion_flwr.device import participant
from msfusion_flwr.engine import SplitSpec
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.models import build_model
from msfusion_flwr.protocol import client_config, message_array_bytes
from msfusion_flwr.server.methods import make_strategy


def measure(config: dict, num_participants: int, rounds: int, node: int) -> tuple[int, float]:
    """(array bytes received by ``node`` per round, median local training seconds)."""
    run = RunConfig.from_mapping(config)
    model = build_model(run.model.name)
    strategy = make_strategy(run, SplitSpec.from_model(model))
    grid = LoopbackGrid(num_participants)
    arrays = ArrayRecord(model.state_dict())
    received, times = [], []
    for server_round in range(1, rounds + 1):
        messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(server_round, arrays, client_config(run), grid)}
        received.append(message_array_bytes(messages[node]))
        reply = participant.train(messages[node], grid.contexts[node])
        times.append(float(reply.content["metrics"]["train-time-s"]))
    return received[0], statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-ratio", type=float, default=0.25)
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--node", type=int, default=0, help="partition id of the measured participant")
    parser.add_argument("--data-fraction", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = {"data-fraction": args.data_fraction, "partitioner": "iid", **MSFUSION_PAPER}
    sub_bytes, sub_time = measure({**base, "split-ratio": args.split_ratio}, args.participants, args.rounds, args.node)
    full_bytes, full_time = measure({**base, "split-ratio": 1.0}, args.participants, args.rounds, args.node)
    full_params = sum(p.numel() for p in build_model("cnn").parameters())
    print(f"full model: {full_params} parameters, {full_bytes} bytes, local training {full_time:.2f} s (median of {args.rounds} rounds)")
    print(f"r = {args.split_ratio}: {sub_bytes} bytes received per round, local training {sub_time:.2f} s")
    print(f"bytes ratio {sub_bytes / full_bytes:.4f}  (target <= 0.10)")
    print(f"training time ratio {sub_time / full_time:.4f}  (target <= 0.20, ideal r^2 = {args.split_ratio ** 2:.4f})")


if __name__ == "__main__":
    main()
