"""Every method for 3 rounds on one model (e.g. a torchvision model whose width groups are derived).

    .venv/bin/python scripts/check_derived_methods.py torchvision:resnet18 fedavg fedavg-small heterofl fedrolex fd fjord feddf msfusion
    .venv/bin/python scripts/check_derived_methods.py --flwr-run torchvision:resnet18 fedavg fedavg-small ...
    .venv/bin/python scripts/check_derived_methods.py --flwr-run --dataset cifar10 --data-dir DIR --rounds 1 torchvision:resnet18 ...

Fashion-MNIST (or ``--dataset`` from ``--data-dir``, e.g. a local CIFAR-10 copy in the Hub's layout, as
``tests/test_cifar.py: write_hub_copy`` writes one), 3 participants with budgets 0.25/0.5/0.25, IID partitions of 5 % of the training set
(FedDF: 5 % more held out as its server slice), seed 0. The server evaluates on the first 1,000 test
images (``test-examples``; the full test set would dominate the time). By default through Flower's
simulation engine in-process (``run_experiment``); with ``--flwr-run`` through ``flwr run .`` against a
local SuperLink that Flower starts in an isolated ``FLWR_HOME`` (stopped, by PID, at the end), as a user
runs it. Prints one line per method: (round, accuracy, loss) and the failed replies. It shows that each
method runs and learns on the model; it is not a comparison (3 rounds, one seed).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from msfusion_flwr.apps import run_experiment
from msfusion_flwr.deployment.flower import flower_bin, flower_env
from msfusion_flwr.deployment.processes import MARKER_KEY, free_port, stop_marked
from msfusion_flwr.server.reporting import read_metrics

REPO = Path(__file__).resolve().parent.parent
NODES = 3
FEDERATION = f"num-supernodes={NODES} client-resources-num-cpus=1"
RUN_TIMEOUT_S = 1800


def run_config(model: str, method: str, output_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    fashion = args.dataset == "fashion-mnist"
    return {
        "method": method, "model": model, "num-server-rounds": args.rounds, "partitioner": "iid",
        "budgets": "0.25,0.5", "min-available-nodes": NODES, "test-examples": 1000, "output-dir": str(output_dir),
        "dataset": args.dataset, **({"data-dir": args.data_dir} if args.data_dir else {}),
        "data-fraction": 0.05 if fashion else 1.0,
        **({"server-data-fraction": 0.05 if fashion else 0.2} if method == "feddf" else {}),
    }  # fmt: skip


def flwr_run(config: dict[str, Any], env: dict[str, str], work: Path) -> None:
    """``flwr run . --stream`` with ``config`` written as a TOML file; raises with the log's tail if it fails."""
    config_file = work / f"{config['method']}.toml"
    config_file.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in config.items()))
    command = [str(flower_bin() / "flwr"), "run", ".", "--stream", "--run-config", str(config_file), "--federation-config", FEDERATION]
    proc = subprocess.run(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    log = proc.stdout + proc.stderr
    (work / f"{config['method']}.log").write_text(log)
    started = re.search(r"Successfully started run (\d+)", log)
    status = _final_status(started.group(1), env) if proc.returncode == 0 and started else f"exit {proc.returncode}"
    if status != "finished:completed":
        raise RuntimeError(f"flwr run of {config['method']} ended {status}:\n{log[-3000:]}")


def _final_status(run_id: str, env: dict[str, str], timeout: float = 60.0) -> str:
    """The run's status once the SuperLink has marked it finished (the log stream can end first)."""
    deadline = time.monotonic() + timeout
    while not (status := _status(run_id, env)).startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
    return status


def _status(run_id: str, env: dict[str, str]) -> str:
    """The run's status as ``flwr ls`` reports it (``finished:completed`` when it ended well)."""
    command = [str(flower_bin() / "flwr"), "ls", "--run-id", run_id, "--format", "json"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    return str(json.loads(proc.stdout)["runs"][0]["status"]) if proc.returncode == 0 else f"flwr ls failed: {proc.stderr}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else repr(value)


def summary(method: str, output_dir: Path, seconds: float) -> str:
    rows = read_metrics(output_dir)
    curve = [(r["round"], round(r["accuracy"], 3), round(r["loss"], 3)) for r in rows]
    return f"{method}: {curve} failures {rows[-1]['failures']} ({seconds:.0f} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flwr-run", action="store_true", help="through `flwr run .` instead of the in-process engine")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("model")
    parser.add_argument("methods", nargs="+")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed check still stops its SuperLink (finally)
    work = Path(tempfile.mkdtemp(prefix="check-derived-"))
    marker = f"check-derived-{uuid.uuid4().hex[:8]}"
    env = flower_env(
        work / "flwr-home", **{MARKER_KEY: marker},
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )  # fmt: skip
    try:
        for method in args.methods:
            started = time.perf_counter()
            config = run_config(args.model, method, work / method, args)
            if args.flwr_run:
                flwr_run(config, env, work)
            else:
                run_experiment(config, num_supernodes=NODES)
            print(summary(method, work / method, time.perf_counter() - started), flush=True)
    finally:
        left = stop_marked(marker) if args.flwr_run else []
    if left:
        print(f"processes left running: {left}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
