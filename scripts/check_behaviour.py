"""Show that two revisions behave identically: a short run of every method, bit for bit.

For each revision (the working tree, and ``--against REV`` checked out into a
temporary git worktree) this runs every method for a few rounds through the
app's own ServerApp and ClientApp (``msfusion_flwr.apps.make_server_app`` /
``make_client_app``), driven in one process by a Grid stand-in that hands each
message to the ClientApp of its node in node order, so the runs are
deterministic (no Ray, no arrival order). It then compares, per method, the
SHA-256 of the metrics rows (wall-clock keys left out) and of the final global
model's tensors.

    .venv/bin/python scripts/check_behaviour.py --against fb3f521
    .venv/bin/python scripts/check_behaviour.py --against main --methods msfusion fedavg

Exit status 0 when every method matches, 1 otherwise. ``--snapshot OUT`` (used
by the comparison itself) runs the methods with whatever ``msfusion_flwr`` is
importable and writes the digests to OUT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
NODES = 4
PAPER = {"window-layout": "rolling", "block-count": 0, "shift-step": 1, "contrastive-weight": 1.0}
"""msfusion's windows and contrastive term before its default became 2 blocks without the term (issue 12)."""
COMMON = {"num-server-rounds": 3, "data-fraction": 0.05, "min-available-nodes": NODES, "eval-every": 3, "classifier-scaler": True, **PAPER}
"""``classifier-scaler = true`` spelled out: the behaviour before ``output-scaling`` (whose default is now ``calibrated``);
likewise :data:`PAPER`, dropped for revisions older than its keys (:func:`current_keys`)."""
RUNS: dict[str, dict[str, Any]] = {
    "msfusion": {"method": "msfusion", "checkpoint-every": 1},
    "msfusion-fixed-overlap-budgets": {"method": "msfusion", "overlap": 0.5, "budgets": "0.25,0.5,1.0"},
    "fedavg": {"method": "fedavg"},
    "fedavg-small": {"method": "fedavg-small"},
    "heterofl": {"method": "heterofl", "classifier-scaler": False},
    "fedrolex": {"method": "fedrolex"},
    "fd": {"method": "fd", "dropout-rate": 0.25},
    "fjord": {"method": "fjord", "budgets": "0.5,1.0"},
    "feddf": {"method": "feddf", "server-data-fraction": 0.1, "distill-steps": 5},
    "msfusion-transformer": {
        "method": "msfusion", "dataset": "wikitext-2", "model": "transformer", "data-dir": str(WIKITEXT),
        "train-split": "valid", "vocab-size": 2000, "seq-len": 32, "partitioner": "contiguous",
        "optimizer": "adam", "learning-rate": 0.0003, "data-fraction": 0.03,
    },
    "msfusion-gpt2": {
        "method": "msfusion", "dataset": "wikitext-2", "model": "gpt2", "data-dir": str(WIKITEXT),
        "train-split": "valid", "vocab-size": 2000, "seq-len": 32, "partitioner": "contiguous",
        "optimizer": "adam", "learning-rate": 0.0003, "data-fraction": 0.03,
    },
}  # fmt: skip
"""Every method, with options that exercise budgets, faults, checkpoints, distillation and a language model.
Keys are spelled as the oldest revision compared knows them; :func:`current_keys` renames them for newer ones."""


def current_keys(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` in the keys of the importable ``msfusion_flwr`` (renamed keys converted, where it renamed any)."""
    from msfusion_flwr import config as app_config

    renamed = getattr(app_config, "RENAMED", {})
    out = {}
    for key, value in config.items():
        if key in PAPER and key not in app_config.DEFAULTS:
            continue  # a revision from before the key did what PAPER spells out
        if key in renamed and key not in app_config.DEFAULTS:
            new, convert = renamed[key]
            out[new] = convert(value)
        else:
            out[key] = value
    return out
TIMING = ("wall_s", "elapsed_s", "train_time_s", "time_s", "server_s")


ADDED_COLUMNS = ("coverage", "dp_epsilon", "screened_out")
"""Prefixes of metrics.jsonl columns added since fb3f521 (coverage, issue 12; dp_epsilon, issue 13): left out so that rows compare."""


def strip_timing(value: Any) -> Any:
    """Metrics rows without wall-clock measurements (and FedDF's timed server costs) and without added columns.

    ``msfusion_flwr.server.reporting.without_timing`` with ``ADDED_COLUMNS`` left out, kept here because this
    script imports ``msfusion_flwr`` from the revision under test, and older revisions lack that function."""
    if isinstance(value, dict):
        return {
            k: strip_timing(v)
            for k, v in value.items()
            if not any(t in k for t in TIMING) and k != "server_costs" and not k.startswith(ADDED_COLUMNS)
        }
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def model_digest(path: Path) -> str:
    import torch

    state = torch.load(path, weights_only=True)
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


class InProcessGrid:
    """A Grid stand-in: every message goes to its node's ClientApp, in node order, in this process.

    The same as ``msfusion_flwr.experiments.loopback.InProcessGrid``, kept here because this script runs
    revisions older than that class (it imports ``msfusion_flwr`` from the revision under test)."""

    def __init__(self, client_app: Any, num_nodes: int) -> None:
        from flwr.app import Context, RecordDict

        self.client_app = client_app
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                state=RecordDict(), run_config={},
            )
            for node in range(1, num_nodes + 1)
        }
        self.pushed: dict[str, Any] = {}
        self.count = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> list[str]:
        """Keep the messages to answer when pulled (newer revisions stream replies through push and pull)."""
        ids = []
        for message in messages:
            self.count += 1
            message.metadata.__dict__["_message_id"] = f"m{self.count}"
            self.pushed[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Any]:
        return self.send_and_receive([self.pushed.pop(i) for i in list(message_ids) if i in self.pushed])

    def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Any]:
        from flwr.app import Error, Message

        replies = []
        for message in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            try:
                replies.append(self.client_app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as exc:  # a failing participant: an error reply, as Flower sends
                replies.append(Message(error=Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message))
        return replies


def snapshot(out_path: Path, methods: list[str], work: Path) -> None:
    """Run ``methods`` with the importable ``msfusion_flwr``; write their digests to ``out_path``."""
    import logging

    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import msfusion_flwr
    from msfusion_flwr.apps import make_client_app, make_server_app

    logging.getLogger("flwr").setLevel(logging.WARNING)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    results = {"package": str(Path(msfusion_flwr.__file__).parent)}
    for name in methods:
        output_dir = work / name
        config = current_keys({**COMMON, **RUNS[name], "output-dir": str(output_dir)})
        if config.get("checkpoint-every"):
            config["participant-state-dir"] = str(work / f"{name}-participants")
        grid = InProcessGrid(make_client_app(), NODES)
        make_server_app(config)(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        results[name] = {
            "metrics": digest(strip_timing(rows)),
            "model": model_digest(output_dir / "global_model.pt"),
            "final": {k: rows[-1][k] for k in ("accuracy", "loss", "perplexity")},
            "rounds": len(rows) - 1,
        }
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")


def run_snapshot(tree: Path, methods: list[str], work: Path) -> dict[str, Any]:
    """:func:`snapshot` of ``tree`` in a subprocess that imports ``msfusion_flwr`` from ``tree``."""
    out = work / "digests.json"
    env = {**os.environ, "PYTHONPATH": str(tree), "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--snapshot", str(out), "--methods", *methods]
    subprocess.run(command, env=env, cwd=work, check=True)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="git revision to compare the working tree with")
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--snapshot", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help="also write both revisions' digests here (JSON)")
    args = parser.parse_args()
    if args.snapshot:
        snapshot(args.snapshot, args.methods, Path.cwd())
        return 0
    if not args.against:
        parser.error("--against REV is required")
    with tempfile.TemporaryDirectory(prefix="msfusion-behaviour-") as tmp:
        tmp_path = Path(tmp)
        old_tree = tmp_path / "against"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), args.against],
                       check=True, capture_output=True)  # fmt: skip
        try:
            (tmp_path / "old").mkdir()
            (tmp_path / "new").mkdir()
            old = run_snapshot(old_tree, args.methods, tmp_path / "old")
            new = run_snapshot(REPO, args.methods, tmp_path / "new")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)], capture_output=True)
    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.against], capture_output=True, text=True).stdout.strip()
    print(f"| run | rounds | metrics ({revision} / working tree) | model ({revision} / working tree) | final metrics | same |")
    print("| --- | --- | --- | --- | --- | --- |")
    same_all = True
    for name in args.methods:
        a, b = old[name], new[name]
        same = a["metrics"] == b["metrics"] and a["model"] == b["model"]
        same_all &= same
        final = ", ".join(f"{k} {v:.4f}" for k, v in b["final"].items() if v is not None)
        print(f"| {name} | {b['rounds']} | {a['metrics']} / {b['metrics']} | {a['model']} / {b['model']} | {final} | {'yes' if same else 'NO'} |")
    if args.output:
        args.output.write_text(json.dumps({"against": revision, "old": old, "new": new}, indent=2) + "\n")
    print("identical" if same_all else "DIFFERENT")
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main())
