"""End-to-end: the app under the real ``flwr run`` (local SuperLink, simulation).

The app runs from a copy of the repository in ``tmp_path``, with its own
``FLWR_HOME`` and its own free ports for the local SuperLink (so it never talks
to, or is confused with, a SuperLink the user started on the default port 39091),
and without runtime dependency installation (the venv already has everything).

``flwr run`` leaves the SuperLink it started running in the background, in a new
session; it spawns a SuperExec (another new session), which spawns
``flwr-simulation`` and its Ray processes. They all inherit this test's
``FLWR_HOME``, which is unique, so teardown ends exactly the processes whose
environment carries it, by PID, even when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from msfusion_flwr.deployment.flower import flower_env
from msfusion_flwr.server.reporting import CONFIG_FILE, CURVES_FILE, METRICS_FILE, MODEL_FILE, read_metrics

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process cleanup reads /proc")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sysconfig.get_path("scripts"))  # the venv's bin/, with flwr, flower-superlink, ...
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info")
FEDERATION = "num-supernodes=4 client-resources-num-cpus=1"
RUN_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with_env(entry: bytes) -> list[int]:
    """PIDs of the processes whose environment holds ``entry`` (``KEY=value``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if entry in environ.split(b"\0"):
            pids.append(int(proc.name))
    return pids


def _kill_all(entry: bytes, grace_s: float = 10.0) -> None:
    """SIGTERM every process carrying ``entry``; SIGKILL what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _pids_with_env(entry)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [pid for pid in _pids_with_env(entry) if not _is_zombie(pid)]
        if not pids:
            return


def _is_zombie(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@dataclass
class Flwr:
    """Runs the ``flwr`` CLI against an isolated local SuperLink."""

    app: Path
    env: dict[str, str]
    tmp: Path

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=self.app,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run(self, run_config: dict[str, object], name: str) -> tuple[str, dict[str, object]]:
        """``flwr run . --stream`` with ``run_config`` (as a TOML file); returns (log, run info)."""
        lines = [f"{key} = {json.dumps(value)}" for key, value in run_config.items()]
        config_file = self.tmp / f"{name}.toml"
        config_file.write_text("\n".join(lines) + "\n")
        proc = self(
            "run", ".", "--stream", "--run-config", str(config_file), "--federation-config", FEDERATION, timeout=RUN_TIMEOUT_S
        )
        output = proc.stdout + proc.stderr
        (self.tmp / f"{name}.log").write_text(output)
        assert proc.returncode == 0, output
        match = re.search(r"Successfully started run (\d+)", output)
        assert match, output
        listing = self("ls", "--run-id", match.group(1), "--format", "json")
        assert listing.returncode == 0, listing.stdout + listing.stderr
        (run_info,) = json.loads(listing.stdout)["runs"]
        return output, run_info


@pytest.fixture(scope="module")
def flwr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flwr]:
    tmp = tmp_path_factory.mktemp("flwr-run")
    app = tmp / "app"
    shutil.copytree(REPO, app, ignore=COPY_IGNORE)
    flwr_home = tmp / "flwr-home"
    env = flower_env(
        flwr_home, BIN, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(_free_port())
    )
    try:
        yield Flwr(app=app, env=env, tmp=tmp)
    finally:
        _kill_all(f"FLWR_HOME={flwr_home}".encode())
    assert not [pid for pid in _pids_with_env(f"FLWR_HOME={flwr_home}".encode()) if not _is_zombie(pid)]


def test_flwr_run_trains_and_writes_outputs(flwr: Flwr) -> None:
    repo_pyproject = (REPO / "pyproject.toml").read_bytes()
    output_dir = flwr.tmp / "outputs" / "smoke"
    log, run_info = flwr.run(
        {
            "num-server-rounds": 2,
            "data-fraction": 0.05, "test-examples": 1000,
            "min-available-nodes": 4,
            "output-dir": str(output_dir),
        },
        "smoke",
    )
    assert run_info["status"] == "finished:completed", log
    assert f"Writing run outputs to {output_dir}" in log
    for name in (METRICS_FILE, CONFIG_FILE, MODEL_FILE, CURVES_FILE):
        assert (output_dir / name).is_file(), name
    rows = read_metrics(output_dir)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert rows[-1]["accuracy"] > 0.1
    assert all(len(row["participants"]) == 4 for row in rows[1:])
    assert json.loads((output_dir / CONFIG_FILE).read_text())["num-server-rounds"] == 2
    # flwr rewrites pyproject.toml when it holds [tool.flwr.federations]; ours must not.
    assert (flwr.app / "pyproject.toml").read_bytes() == repo_pyproject
    assert (REPO / "pyproject.toml").read_bytes() == repo_pyproject


def test_flwr_run_rejects_invalid_config_without_training(flwr: Flwr) -> None:
    output_dir = flwr.tmp / "outputs" / "invalid"
    log, run_info = flwr.run({"split-ratio": 2.0, "output-dir": str(output_dir)}, "invalid")
    assert run_info["status"] == "finished:failed", log
    assert "invalid run config: config key 'split-ratio' must be a number in (0.0, 1.0], got 2.0" in log
    assert "[ROUND 1" not in log
    assert not output_dir.exists()


def test_flwr_run_with_too_few_nodes_ends_at_the_deadline_with_the_ways_out(flwr: Flwr) -> None:
    """4 SuperNodes, min-available-nodes 6: the run fails after node-wait-timeout, one line naming both ways out."""
    output_dir = flwr.tmp / "outputs" / "few-nodes"
    start = time.monotonic()
    log, run_info = flwr.run({"min-available-nodes": 6, "node-wait-timeout": 5.0, "output-dir": str(output_dir)}, "few-nodes")
    assert time.monotonic() - start < 180  # node-wait-timeout plus the run's start-up
    assert run_info["status"] == "finished:failed", log
    assert "run stopped: only 4 node(s) connected after 5 s, min-available-nodes is 6: lower min-available-nodes" in log
    assert "num-supernodes" in log and "[ROUND 1" not in log
    assert not output_dir.exists()


def test_flwr_run_refuses_partitions_that_cannot_be_made_at_start(flwr: Flwr) -> None:
    """30 training images for 4 Dirichlet partitions: one line at start naming what to change, no round trained."""
    output_dir = flwr.tmp / "outputs" / "tiny"
    log, run_info = flwr.run({"data-fraction": 0.0005, "test-examples": 1000, "min-available-nodes": 4, "output-dir": str(output_dir)}, "tiny")
    assert run_info["status"] == "finished:failed", log
    assert "invalid run config: cannot make 4 'dirichlet' partitions of fashion-mnist (data-fraction 0.0005" in log
    assert "[ROUND 1" not in log
    assert not output_dir.exists()
