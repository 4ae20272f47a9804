"""Where the time of one train message goes, in a fresh process (deployment) and a warm one (simulation).

Flower 1.41's deployment engine starts a fresh ``flwr-clientapp`` process for every message; the
simulation engine keeps its Ray actors, so from the second message on a participant pays no process
start and no imports. This script reproduces both on this machine, with the app's real code:

* the server side (this process): the strategy plans and slices every participant's message
  (``configure_train``), and after they trained it checks and fuses their replies (``aggregate_train``),
  each divided by the number of participants;
* one participant, in a fresh Python process fed the message as Flower's protobuf bytes: process start
  (interpreter up), ``import torch``, the rest of the ClientApp's imports (Flower, the app), decoding the
  message, then ``participant.train``'s phases (the narrow model built, the partition loaded, local
  training, the rest) and encoding the reply as protobuf; then the same message again in that process,
  which is what a warm simulation actor pays.

    .venv/bin/python scripts/message_breakdown.py --participants 10 --split-ratio 0.25 --data-fraction 0.2

Timings are wall-clock seconds of one run each (with one torch thread, as one CPU per participant);
other load on the machine inflates them; compare phases within one run. The gRPC transport, the
SuperNode's and SuperLink's own work and the network are not in it (``flwr run`` measurements: docs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
started = time.perf_counter()
import torch
torch.set_num_threads(1)
after_torch = time.perf_counter()
import client_app  # noqa: F401  (what flwr-clientapp loads: Flower and the app)
from flwr.common import serde
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.app import Context, RecordDict
from msfusion_flwr.device import participant
after_imports = time.perf_counter()

phases = {}
def timed(owner, name, label):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            phases[label] = phases.get(label, 0.0) + time.perf_counter() - t
    setattr(owner, name, wrapper)

timed(participant, "load_partition", "partition load")
timed(participant, "train_local", "local training")
factory = participant.model_factory
def timed_factory(*args, **kwargs):
    make = factory(*args, **kwargs)
    def build(*a, **k):
        t = time.perf_counter()
        try:
            return make(*a, **k)
        finally:
            phases["model build"] = phases.get("model build", 0.0) + time.perf_counter() - t
    return build
participant.model_factory = timed_factory

node_config = json.loads(sys.argv[2])
payload = open(sys.argv[1], "rb").read()
rows = []
for attempt in ("fresh process", "warm process"):
    phases.clear()
    t = time.perf_counter()
    proto = ProtoMessage()
    proto.ParseFromString(payload)
    message = serde.message_from_proto(proto)
    decoded = time.perf_counter()
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    t_train = time.perf_counter()
    reply = participant.train(message, context)
    trained = time.perf_counter()
    encoded_bytes = len(serde.message_to_proto(reply).SerializeToString())
    encoded = time.perf_counter()
    row = {"message decode": decoded - t, **phases, "reply encode": encoded - trained}
    row["rest of train handler"] = (trained - t_train) - sum(phases.values())
    if attempt == "fresh process":
        row = {"import torch": after_torch - started, "other imports (Flower, app)": after_imports - after_torch, **row}
    rows.append({"attempt": attempt, "phases": row, "reply_bytes": encoded_bytes})
print(json.dumps({"rows": rows, "started_at": time.time() - (time.perf_counter() - started)}))
"""


def server_side(config: dict, participants: int) -> tuple[dict, list, float, float]:
    """Round 1's messages, and the per-participant seconds of planning/slicing and of checking/fusing."""
    import torch
    from flwr.app import ArrayRecord

    from msfusion_flwr.config import RunConfig
    from msfusion_flwr.device import participant
    from msfusion_flwr.engine import SplitSpec
    from msfusion_flwr.experiments.loopback import LoopbackGrid
    from msfusion_flwr.models import build_model
    from msfusion_flwr.protocol import client_config
    from msfusion_flwr.server.methods import make_strategy

    torch.set_num_threads(1)
    run = RunConfig.from_mapping(config)
    model = build_model(run.model.name)
    strategy = make_strategy(run, SplitSpec.from_model(model))
    grid = LoopbackGrid(participants)
    arrays = ArrayRecord(model.state_dict())
    t = time.perf_counter()
    messages = list(strategy.configure_train(1, arrays, client_config(run), grid))
    configure = (time.perf_counter() - t) / participants
    replies = [participant.train(m, grid.contexts[m.metadata.dst_node_id]) for m in messages]
    t = time.perf_counter()
    strategy.aggregate_train(1, replies)
    aggregate = (time.perf_counter() - t) / participants
    return messages[0], grid.contexts[messages[0].metadata.dst_node_id].node_config, configure, aggregate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--split-ratio", type=float, default=0.25)
    parser.add_argument("--data-fraction", type=float, default=0.2)
    parser.add_argument("--method", default="msfusion")
    parser.add_argument("--model", default="cnn")
    args = parser.parse_args()
    from flwr.common import serde

    config = {
        "method": args.method, "model": args.model, "split-ratio": args.split_ratio,
        "data-fraction": args.data_fraction, "partitioner": "iid", "min-available-nodes": args.participants,
    }  # fmt: skip
    message, node_config, configure, aggregate = server_side(config, args.participants)
    encoded = serde.message_to_proto(message).SerializeToString()
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "message.pb"
        payload.write_bytes(encoded)
        spawned = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(payload), json.dumps(node_config)],
            cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{args.method} on {args.model}, {args.participants} participants at r = {args.split_ratio}, data-fraction {args.data_fraction}")
    print(f"message to a participant: {len(encoded)} bytes; reply {result['rows'][0]['reply_bytes']} bytes")
    print(f"server, per participant: configure_train {configure:.3f} s, aggregate_train {aggregate:.3f} s")
    print(f"process start (spawn to interpreter running the script): {result['started_at'] - spawned:.3f} s")
    for row in result["rows"]:
        total = sum(row["phases"].values())
        training = row["phases"].get("local training", 0.0)
        print(f"{row['attempt']}: total {total:.3f} s, of which local training {training:.3f} s, beyond training {total - training:.3f} s")
        for phase, seconds in row["phases"].items():
            print(f"  {phase:32s} {seconds:8.3f} s")


if __name__ == "__main__":
    main()
