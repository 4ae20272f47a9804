"""End-to-end under Flower's deployment engine: ``scripts/deploy_local.py`` and :mod:`msfusion_flwr.deployment`.

A real SuperLink and real SuperNodes (separate processes, on loopback, free
ports, their own ``FLWR_HOME``) run the app from a copy of the repository via
``flwr run``. Each SuperNode's ``--node-config`` carries its partition and its
own ``split-ratio`` budget, which reaches the server through the profile query:
the bytes each participant receives must follow its budget. Every test also
checks that no process the deployment started is left running, by PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks read /proc")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "deploy_local.py"
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info")
RUN_TIMEOUT_S = 300


import msfusion_flwr.deployment as dl  # noqa: E402
from msfusion_flwr.config import MSFUSION_PAPER  # noqa: E402


def _quick(output_dir: Path, rounds: int, nodes: int) -> dict[str, object]:
    return {
        "num-server-rounds": rounds,
        "data-fraction": 0.02, "test-examples": 1000,
        "min-available-nodes": nodes,
        "eval-every": 100,  # evaluate at round 0 and at the end only
        "output-dir": str(output_dir),
    }


def _rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _bytes_down_by_partition(row: dict) -> dict[int, int]:
    return {int(c["partition_id"]): int(c["bytes_down"]) for c in row["per_participant"]}


def _full_model_bytes() -> int:
    from msfusion_flwr.models import build_model

    return sum(t.numel() * t.element_size() for t in build_model("cnn").state_dict().values())


def _pids_with_env(entry: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if entry.encode() in (proc / "environ").read_bytes().split(b"\0") and dl.pid_alive(int(proc.name)):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def _assert_all_stopped(dep) -> None:
    assert dep.started_pids and set(dep.started_pids) <= dep.seen_pids
    assert dl.pids_with_marker(dep.marker) == []
    assert dep.leftovers() == []
    assert _pids_with_env(f"FLWR_HOME={dep.flwr_home}") == []


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository: the app ``flwr run`` builds (no outputs/, no .venv)."""
    copy = tmp_path_factory.mktemp("deploy") / "app"
    shutil.copytree(REPO, copy, ignore=COPY_IGNORE)
    return copy


def test_sigterm_stops_every_process_the_command_line_started(app: Path, tmp_path: Path) -> None:
    work = tmp_path / "cli"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--nodes", "2", "--app", str(app), "--work-dir", str(work), "--grace", "5",
         "--run-config", f"num-server-rounds=50 min-available-nodes=2 output-dir='{tmp_path / 'outputs' / 'long'}'"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    lines = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if "Writing run outputs to" in line or time.monotonic() > deadline:
                break  # the ServerApp runs (under the SuperLink's SuperExec, in a session of its own)
        assert any("Writing run outputs to" in line for line in lines), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    assert "interrupted by SIGTERM" in out
    started = json.loads(re.search(r"Started PIDs (\[[\d, ]+\])", out).group(1))
    assert len(started) == 3
    assert not [pid for pid in started if dl.pid_alive(pid)]
    assert _pids_with_env(f"FLWR_HOME={work / 'flwr-home'}") == []


def _wait_for_round(output_dir: Path, server_round: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(row["round"] >= server_round for row in _rows(output_dir)):
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"round {server_round} not reached in {timeout:.0f} s")


def test_supernode_killed_in_round_2_is_left_out_and_rejoins(app: Path, tmp_path: Path) -> None:
    """3 SuperNodes (budgets 0.25/0.5/1.0), 3 rounds of MSfusion; node 2 is killed (SIGKILL) as round 2
    starts and restarted while the server still waits for it: round 2 is aggregated from partitions
    0 and 1, the run goes on, and the restarted node (a new node id) takes part in round 3."""
    import threading

    output_dir = tmp_path / "outputs" / "kill"
    config = {**_quick(output_dir, rounds=3, nodes=3), "round-timeout": 45.0, **MSFUSION_PAPER}  # slices cut to each node's budget
    dep = dl.LocalDeployment(nodes=3, budgets=(0.25, 0.5, 1.0), app_dir=app, work_dir=tmp_path / "deploy", node_threads=1)
    results: list = []
    with dep:
        runner = threading.Thread(target=lambda: results.append(dep.run(config, timeout=RUN_TIMEOUT_S)))
        runner.start()
        _wait_for_round(output_dir, 1, timeout=RUN_TIMEOUT_S)
        dep.kill_supernode(2)  # a crash while round 2 is under way
        dep.restart_supernode(2)  # back (new node id) before round 2's 45 s timeout ends
        runner.join(RUN_TIMEOUT_S)
        assert not runner.is_alive()
        invalid = dep.run({"split-ratio": 2.0, "output-dir": str(tmp_path / "outputs" / "invalid")}, timeout=120)
    _assert_all_stopped(dep)
    result = results[0]
    assert result.status == "finished:completed", result.log[-4000:]
    rows = _rows(output_dir)
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert rows[1]["participants"] == [0, 1, 2]
    assert rows[2]["participants"] == [0, 1]
    assert any(f.startswith("partition 2 ") for f in rows[2]["failures"]), rows[2]["failures"]
    assert 2 in rows[3]["participants"], rows[3]["failures"]
    assert rows[3]["accuracy"] > 0.1
    down = _bytes_down_by_partition(rows[1])  # each node's own split-ratio reached the server
    assert down[0] < down[1] < down[2] == _full_model_bytes(), down
    assert rows[1]["bytes_down"] == sum(down.values())
    # `flwr run --stream` exits 0 on a failed run too; the status comes from `flwr ls`
    assert invalid.status == "finished:failed" and invalid.returncode == 0
    assert "invalid run config: config key 'split-ratio'" in invalid.log


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("ssh-keygen") is None, reason="needs openssl and ssh-keygen")
def test_with_supernode_auth_an_unregistered_supernode_cannot_join_while_a_registered_one_trains(app: Path, tmp_path: Path) -> None:
    """TLS and SuperNode authentication: node 0's public key is registered (``flwr supernode register``), node 1's
    is not; node 1 is refused, the SuperLink lists one node, and the run trains partition 0 alone."""
    output_dir = tmp_path / "outputs" / "auth"
    dep = dl.LocalDeployment(nodes=2, auth=True, unregistered=[1], app_dir=app, work_dir=tmp_path / "deploy", node_threads=1)
    with dep:
        result = dep.run({**_quick(output_dir, rounds=1, nodes=1), "round-timeout": 60.0}, timeout=RUN_TIMEOUT_S)
        online = dep.online_nodes()
    _assert_all_stopped(dep)
    assert result.status == "finished:completed", result.log[-4000:]
    assert len(online) == 1
    logs = tmp_path / "deploy" / "logs"
    assert "No SuperNode found with the given public key" in (logs / "superlink.log").read_text(errors="replace")
    rows = _rows(output_dir)
    assert [row["participants"] for row in rows[1:]] == [[0]]
    assert rows[1]["per_participant"][0]["partition_id"] == 0
    # TLS everywhere: the SuperLink serves HTTPS, the CLI and the SuperNodes trust the generated CA
    certs = tmp_path / "deploy" / "certs"
    assert all((certs / name).is_file() for name in ("ca.pem", "server.pem", "server.key"))
    assert "running on https://127.0.0.1:" in (logs / "superlink.log").read_text(errors="replace")
    connection = (dep.flwr_home / "config.toml").read_text()
    assert f'root-certificates = "{certs / "ca.pem"}"' in connection and "insecure" not in connection
    keys = tmp_path / "deploy" / "keys"
    assert all((keys / name).is_file() for name in ("supernode-0", "supernode-0.pub", "supernode-1", "supernode-1.pub"))
