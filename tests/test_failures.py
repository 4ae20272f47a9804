"""A user's mistake never hangs or fails silently: each ends within its deadline with one line saying what to do.

In-process (``run_experiment``, Flower's simulation engine); the same mistakes
through ``flwr run`` are in ``test_flwr_run.py``.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from msfusion_flwr.apps import run_experiment
from msfusion_flwr.config import ConfigError
from msfusion_flwr.data import DataSettings, PartitionError, check_partitions
from msfusion_flwr.device import participant
from msfusion_flwr.server.nodes import NodesUnavailable, wait_for_nodes
from msfusion_flwr.server.replies import error_summary
from msfusion_flwr.server.reporting import read_metrics
from msfusion_flwr.server.run import RunAborted

REPO = Path(__file__).resolve().parents[1]


class FewNodes:
    """A Grid with a fixed set of connected nodes."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.count + 1))


def test_waiting_for_nodes_ends_at_the_deadline_with_the_ways_out():
    start = time.monotonic()
    with pytest.raises(NodesUnavailable) as info:
        wait_for_nodes(FewNodes(4), 10, timeout_s=1.5, poll_s=0.2)
    waited = time.monotonic() - start
    assert 1.5 <= waited < 3.0
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("only 4 node(s) connected after 1.5 s", "min-available-nodes is 10", "num-supernodes", "node-wait-timeout"):
        assert fragment in message
    assert wait_for_nodes(FewNodes(4), 4, timeout_s=0.1) == [1, 2, 3, 4]  # enough nodes: no wait


def test_in_process_runner_refuses_more_nodes_than_it_simulates_before_starting_ray(tmp_path):
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        run_experiment({"min-available-nodes": 10, "output-dir": str(tmp_path / "run")}, num_supernodes=4)
    assert time.monotonic() - start < 5.0  # no Ray start, no data loaded
    assert "'min-available-nodes' is 10 but the simulation has 4 SuperNodes" in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_impossible_dirichlet_partitions_are_one_line_with_what_to_change():
    tiny = DataSettings(data_fraction=0.005)  # 300 images for 40 partitions: flwr-datasets gives up
    with pytest.raises(PartitionError) as info:
        check_partitions(tiny, 40)
    message = str(info.value)
    assert "\n" not in message
    for fragment in ("cannot make 40 'dirichlet' partitions", "data-fraction 0.005", "dirichlet-alpha 0.5",
                     "raise data-fraction", "raise dirichlet-alpha", "partitioner='iid'"):  # fmt: skip
        assert fragment in message, message
    sizes = check_partitions(DataSettings(data_fraction=0.005, partitioner="iid"), 40)
    assert len(sizes) == 40 and sum(sizes) == 300


def test_a_partition_too_small_to_train_on_is_refused():
    with pytest.raises(PartitionError, match=r"partition \d+ holds 1 training example\(s\) of 150, at least 2"):
        check_partitions(DataSettings(data_fraction=0.0025, partitioner="iid"), 100)


def test_an_impossible_partitioning_stops_the_run_at_start_and_writes_nothing(tmp_path):
    """30 images for 4 Dirichlet partitions (flwr-datasets wants 10 each): refused before round 1, nothing written."""
    out = tmp_path / "run"
    with pytest.raises(PartitionError, match="cannot make 4 'dirichlet' partitions"):
        run_experiment({"data-fraction": 0.0005, "test-examples": 1000, "min-available-nodes": 4, "output-dir": str(out)}, num_supernodes=4)
    assert not out.exists()  # checked before anything is written


def broken_device_app() -> ClientApp:
    """Every participant fails: its ClientApp raises, as a device with a broken install would."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        raise ValueError("broken device: no space left on /data")

    app.query()(participant.query)
    return app


def test_a_run_where_every_participant_fails_stops_after_max_failed_rounds_with_the_reason(tmp_path):
    out = tmp_path / "run"
    config = {"num-server-rounds": 20, "max-failed-rounds": 2, "data-fraction": 0.05, "test-examples": 1000, "min-available-nodes": 3, "eval-every": 100,
              "output-dir": str(out)}  # fmt: skip
    with pytest.raises(RunAborted) as info:
        run_experiment(config, num_supernodes=3, client_app=broken_device_app())
    message = str(info.value)
    assert "\n" not in message
    assert "no participant's update was accepted in 2 rounds in a row (rounds 1-2, max-failed-rounds 2)" in message
    assert "3 x error reply (ValueError: broken device: no space left on /data)" in message
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:  # every failure reason is one line: the exception, not a traceback
        assert len(row["failures"]) == 3
        assert all(f.endswith("error reply (ValueError: broken device: no space left on /data)") for f in row["failures"])


RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1, ip=1.2.3.4)\n"
    '  File "/site-packages/flwr/clientapp/client_app.py", line 161, in __call__\n'
    "    return self._registered_funcs[full_name](message, context)\n"
    "msfusion_flwr.device.faults.SimulatedDropout: simulated dropout (dropout-rate 0.2)\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    '  File "/site-packages/flwr/simulation/ray_transport/ray_actor.py", line 65, in run\n'
    "    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. Message: simulated dropout'>"
)


@pytest.mark.parametrize(
    ("reason", "summary"),
    [
        (RAY_REASON, "SimulatedDropout: simulated dropout (dropout-rate 0.2)"),
        ("<class 'ZeroDivisionError'>:<'division by zero'>", "ZeroDivisionError: division by zero"),
        ("An exception was raised when attempting to load `ClientApp`", "An exception was raised when attempting to load `ClientApp`"),
        ("x" * 1000, "x" * 297 + "..."),
    ],
    ids=["ray-traceback", "deployment", "plain", "long"],
)
def test_error_reasons_become_one_line(reason, summary):
    assert error_summary(reason) == summary


def test_presets_that_need_more_nodes_than_flowers_default_say_so_first():
    """Flower simulates 2 SuperNodes by default; a preset needing more says how many, with the command, on line 1."""
    for path in sorted((REPO / "conf").glob("*.toml")):
        if path.name.startswith("compare-"):
            continue
        text = path.read_text()
        needed = tomllib.loads(text).get("min-available-nodes", 2)
        if needed > 2:
            first = text.splitlines()[0]
            assert first.startswith(f"# Needs {needed} SuperNodes: flwr run . ") and f"num-supernodes={needed}" in first, path.name
            assert f"--run-config conf/{path.name}" in first, path.name
