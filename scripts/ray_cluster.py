"""Simulation on an existing Ray cluster, checked end to end on loopback.

The recipe (Flower 1.41 has no federation-config key for a Ray address; its
RayBackend calls ``ray.init()`` without one, and Ray then connects to
``RAY_ADDRESS``)::

    ray start --head --port 6379 --num-cpus 8                  # on the head machine
    ray start --address <head>:6379 --num-cpus 8               # on every other machine
    RAY_ADDRESS=<head>:6379 flwr run . --stream --federation-config "num-supernodes=100 client-resources-num-cpus=1"

``RAY_ADDRESS`` must be in the environment of the local SuperLink that ``flwr run``
starts (it spawns the simulation): stop a SuperLink already running without it
first. Every machine needs the same Python environment (this project installed)
and the data at the same path.

This script does exactly that on one machine: a head and a second Ray node with
one CPU each (``ray start``), a 2-round MSfusion run of 4 participants (5 % of
Fashion-MNIST) through ``flwr run`` with its own FLWR_HOME and ports, then checks
that the run completed and that Flower's ClientApp actors ran on both Ray
nodes, and stops every process it started by PID (they all carry a marker in
their environment), also when something fails::

    .venv/bin/python scripts/ray_cluster.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path

from msfusion_flwr.deployment.flower import flower_env
from msfusion_flwr.deployment.processes import (
    MARKER_KEY,
    free_port,
    stop_marked,
)
from msfusion_flwr.server.reporting import read_metrics

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sysconfig.get_path("scripts"))
RUN_CONFIG = {"num-server-rounds": 2, "data-fraction": 0.05, "min-available-nodes": 4, "partitioner": "iid"}
FEDERATION = "num-supernodes=4 client-resources-num-cpus=1"
ACTOR_CLASS = "ClientAppActor"


def _run(args: list[str], env: dict[str, str], timeout: float, cwd: Path = REPO) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ... exited {proc.returncode}: {output[-2000:]}")
    return output


def _actor_nodes(address: str) -> tuple[int, dict[str, int]]:
    """(alive Ray nodes, ClientApp actors per Ray node id) as the cluster's GCS records them."""
    import ray
    from ray._private import (
        state,  # the GCS view; ray.util.state needs the dashboard, which is off
    )

    ray.init(address=address, log_to_driver=False)
    try:
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        per_node: dict[str, int] = {}
        for actor in state.actors().values():
            if actor["ActorClassName"] == ACTOR_CLASS:
                node = actor["Address"]["NodeID"]
                per_node[node] = per_node.get(node, 0) + 1
        return alive, per_node
    finally:
        ray.shutdown()


def main() -> int:
    marker = f"ray-cluster-{uuid.uuid4().hex[:12]}"
    work = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = flower_env(
        work / "flwr-home", BIN, **{MARKER_KEY: marker}, RAY_USAGE_STATS_ENABLED="0",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
    )  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    ray = [str(BIN / "ray"), "start", "--num-cpus", "1", "--temp-dir", str(work / "ray"), "--disable-usage-stats"]
    failed = True
    try:
        _run([*ray, "--head", "--port", str(port), "--include-dashboard=false"], env, 120)
        _run([*ray, "--address", address], env, 120)
        print(f"Ray cluster at {address}: head + 1 node, 1 CPU each (work dir {work})", flush=True)
        output_dir = work / "outputs"
        config = work / "run.toml"
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {**RUN_CONFIG, "output-dir": str(output_dir)}.items()))
        started = time.monotonic()
        log = _run(
            [str(BIN / "flwr"), "run", ".", "--stream", "--run-config", str(config), "--federation-config", FEDERATION],
            {**env, "RAY_ADDRESS": address}, 900,
        )  # fmt: skip
        (work / "flwr-run.log").write_text(log)
        run_id = re.search(r"Successfully started run (\d+)", log)
        if run_id is None:
            raise RuntimeError(f"flwr run printed no run id: {log[-2000:]}")
        listing = json.loads(_run([str(BIN / "flwr"), "ls", "--run-id", run_id.group(1), "--format", "json"], env, 60))
        status = listing["runs"][0]["status"]
        rows = read_metrics(output_dir)
        print(f"flwr run: {status} in {time.monotonic() - started:.0f} s; accuracy by round "
              + ", ".join(f"{r['round']}: {r['accuracy']:.3f}" for r in rows), flush=True)  # fmt: skip
        alive, per_node = _actor_nodes(address)
        print(f"Ray nodes alive: {alive}; {ACTOR_CLASS}s per Ray node: {sorted(per_node.values())}", flush=True)
        failed = status != "finished:completed" or alive != 2 or len(per_node) != 2
    finally:
        left = stop_marked(marker)
        print(f"stopped every process started (marker {marker})" if not left else f"still running: {left}", flush=True)
    if failed or left:
        print("FAILED: " + ("the run did not complete on both Ray nodes" if failed else "processes left behind"))
        return 1
    print("OK: the simulation ran on both Ray nodes of the existing cluster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
