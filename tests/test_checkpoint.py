"""Checkpoint and resume: atomic writes, and an interrupted-and-resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msfusion_flwr.apps import run_experiment
from msfusion_flwr.config import ConfigError, RunConfig
from msfusion_flwr.device import state as participant_state
from msfusion_flwr.server import checkpoint as ckpt
from msfusion_flwr.server.reporting import MODEL_FILE, read_metrics, without_timing

ROOT = Path(__file__).resolve().parents[1]
RUN = {
    "method": "msfusion",
    "num-server-rounds": 3,
    "data-fraction": 0.03, "test-examples": 1000,
    "partitioner": "iid",
    "eval-every": 1,
    "seed": 3,
    "min-available-nodes": 3,
    "checkpoint-every": 1,
    "contrastive-weight": 1.0,
}


# --- atomic writes ----------------------------------------------------------


def test_checkpoint_holds_the_round_and_a_failed_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    """A write that dies half-way leaves neither a partial checkpoint nor a temporary file."""
    config = RunConfig.from_mapping({"output-dir": str(tmp_path)})
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    ckpt.save_checkpoint(tmp_path, 1, state, config, cumulative_totals={0: {"flops": 5.0}})
    first = ckpt.load_checkpoint(tmp_path)
    assert first["round"] == 1 and torch.equal(first["global_model"]["w"], state["w"])
    assert first["cumulative_totals"] == {0: {"flops": 5.0}}

    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2, 3)}, config)
    monkeypatch.setattr(torch, "save", real_save)
    again = ckpt.load_checkpoint(tmp_path)
    assert again["round"] == 1 and torch.equal(again["global_model"]["w"], state["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.CHECKPOINT_FILE]


def test_rng_states_round_trip():
    """Restoring the saved RNG states replays the same python, numpy and torch draws."""
    import random

    import numpy as np

    saved = ckpt.rng_states()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)
    ckpt.restore_rng_states(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_participant_state_keeps_what_a_resume_needs(tmp_path):
    """The newest round before the asked one is returned; other runs' files (other tag) are ignored."""
    plan = {"index.fc": [0, 1], "width.fc": 4}
    for r in (1, 2, 3):
        participant_state.save_participant_state(tmp_path, 7, "run-a", r, {"w": torch.full((2,), float(r))}, plan, 0.5, 1)
    found = participant_state.load_participant_state(tmp_path, 7, "run-a", 3)  # resuming round 3 after a kill in round 3
    assert found is not None and found[0] == 2 and torch.equal(found[1]["arrays"]["w"], torch.full((2,), 2.0))
    assert found[1]["plan"] == plan and found[1]["rate"] == 0.5
    assert participant_state.load_participant_state(tmp_path, 7, "run-b", 3) is None
    assert participant_state.load_participant_state(tmp_path, 7, "run-a", 1) is None
    # A resumed round 2 drops the abandoned rounds 2 and 3.
    participant_state.save_participant_state(tmp_path, 7, "run-a", 2, {"w": torch.full((2,), 20.0)}, plan, 0.5, 1)
    assert participant_state.load_participant_state(tmp_path, 7, "run-a", 4)[1]["arrays"]["w"][0] == 20.0


# --- resume ---------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("uninterrupted")
    return run_experiment(
        {**RUN, "output-dir": str(base / "out"), "participant-state-dir": str(base / "state")}, num_supernodes=3
    )


def _processes_of(session: int) -> list[int]:
    """Live processes whose session or process group is ``session``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgrp, sid = fields[0], int(fields[2]), int(fields[3])
        if state != "Z" and (pgrp == session or sid == session):
            pids.append(int(entry.name))
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole session (Ray's processes included) and check that none is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while (left := _processes_of(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not _processes_of(proc.pid), "processes of the killed run are still alive"


def _checkpoint_round(output_dir: Path) -> int:
    try:
        found = ckpt.load_checkpoint(output_dir)
    except Exception:  # the file is replaced atomically, but be lenient
        return -1
    return -1 if found is None else int(found["round"])


def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    """Killed (SIGKILL, whole process group) after round 2's checkpoint, resumed: same rows, same model bits."""
    out, state = tmp_path / "out", tmp_path / "state"
    toml = tmp_path / "run.toml"
    lines = [f'{k} = {str(v).lower() if isinstance(v, bool) else repr(v) if not isinstance(v, str) else chr(34) + v + chr(34)}'
             for k, v in {**RUN, "output-dir": str(out), "participant-state-dir": str(state)}.items()]
    toml.write_text("\n".join(lines) + "\n")
    log = (tmp_path / "child.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "msfusion_flwr", "--run-config", str(toml), "--num-supernodes", "3"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while _checkpoint_round(out) < 2:
            assert proc.poll() is None, f"child exited early:\n{(tmp_path / 'child.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no round-2 checkpoint in time"
            time.sleep(0.05)
    finally:
        _kill_session(proc)
        log.close()
    assert _checkpoint_round(out) == 2, "the child finished before it could be interrupted"

    resumed = run_experiment(
        {**RUN, "output-dir": str(out), "participant-state-dir": str(state), "resume": True}, num_supernodes=3
    )
    rows, expected = read_metrics(resumed), read_metrics(uninterrupted)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert without_timing(rows) == without_timing(expected)
    assert rows[-1]["accuracy"] is not None
    a, b = torch.load(uninterrupted / MODEL_FILE), torch.load(resumed / MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _checkpoint_round(out) == 3


def test_resume_with_a_changed_config_is_a_one_line_error(uninterrupted):
    """Only 'resume' may differ from the checkpointed run's config."""
    with pytest.raises(ConfigError) as info:
        run_experiment(
            {**RUN, "output-dir": str(uninterrupted), "participant-state-dir": "elsewhere", "learning-rate": 0.1,
             "resume": True},
            num_supernodes=3,
        )  # fmt: skip
    message = str(info.value)
    assert "'resume'" in message and "learning-rate" in message and "\n" not in message


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path):
    """resume = true on an output dir without checkpoint.pt runs the whole federation."""
    out = run_experiment(
        {**RUN, "num-server-rounds": 1, "checkpoint-every": 0, "output-dir": str(tmp_path / "fresh"), "resume": True},
        num_supernodes=3,
    )
    assert [r["round"] for r in read_metrics(out)] == [0, 1]
    assert not (out / ckpt.CHECKPOINT_FILE).exists()


def test_a_key_added_after_the_checkpoint_counts_as_its_default_on_resume(tmp_path):
    """A checkpoint written before 'node-wait-timeout' existed resumes when it is left at its default, not otherwise."""
    overrides = {"output-dir": str(tmp_path), "resume": True}
    config = RunConfig.from_mapping(overrides)
    path = ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, config)
    older = torch.load(path, weights_only=True)
    del older["config"]["node-wait-timeout"]
    torch.save(older, path)
    assert ckpt.resume_state(config)["round"] == 2
    with pytest.raises(ConfigError, match="node-wait-timeout"):
        ckpt.resume_state(RunConfig.from_mapping({**overrides, "node-wait-timeout": 5.0}))


@pytest.mark.parametrize(("stored", "resumes_as"), [({"classifier-scaler": True}, "scaler"), ({"classifier-scaler": False}, "none"), ({}, "scaler")])
def test_a_checkpoint_from_before_output_scaling_resumes_as_what_it_ran(tmp_path, stored, resumes_as):
    """classifier-scaler true/false is output-scaling 'scaler'/'none'; before either key the app ran the Scaler."""
    overrides = {"output-dir": str(tmp_path), "resume": True}
    path = ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, RunConfig.from_mapping(overrides))
    older = torch.load(path, weights_only=True)
    del older["config"]["output-scaling"]
    older["config"].update(stored)
    torch.save(older, path)
    assert ckpt.resume_state(RunConfig.from_mapping({**overrides, "output-scaling": resumes_as}))["round"] == 2
    other = next(s for s in ("calibrated", "scaler", "none") if s != resumes_as)
    with pytest.raises(ConfigError, match="output-scaling"):
        ckpt.resume_state(RunConfig.from_mapping({**overrides, "output-scaling": other}))


# --- extending a finished run ----------------------------------------------


def test_a_finished_run_moved_and_extended_equals_the_longer_run(tmp_path):
    """2 rounds, the folder moved (participants' state inside it), then resumed to 3 rounds: the 3-round run's
    rows and model bits. checkpoint-every = 5 never divides a round here: the last round is checkpointed anyway."""
    from msfusion_flwr.experiments.loopback import run_in_process

    def config(out: Path, rounds: int, **more) -> dict:
        return {**RUN, "num-server-rounds": rounds, "checkpoint-every": 5, "output-dir": str(out),
                "participant-state-dir": str(out / "participants"), **more}  # fmt: skip

    longer = run_in_process(config(tmp_path / "longer", 3), num_supernodes=3)
    short = run_in_process(config(tmp_path / "a" / "run", 2), num_supernodes=3)
    assert _checkpoint_round(short) == 2 and any((short / "participants").iterdir())
    moved = tmp_path / "b" / "run"
    moved.parent.mkdir()
    short.rename(moved)
    extended = run_in_process(config(moved, 3, resume=True), num_supernodes=3)
    rows, expected = read_metrics(extended), read_metrics(longer)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert without_timing(rows) == without_timing(expected)  # contrastive: round 3 used the moved state files
    a, b = torch.load(longer / MODEL_FILE), torch.load(extended / MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((extended / "config.json").read_text())["num-server-rounds"] == 3
    assert _checkpoint_round(extended) == 3

    before = (extended / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as info:
        run_in_process(config(moved, 2, resume=True), num_supernodes=3)
    message = str(info.value)
    assert "'num-server-rounds'" in message and "below round 3" in message and "\n" not in message
    assert (extended / "metrics.jsonl").read_text() == before  # refused before anything was written


def test_a_resume_warns_only_when_the_participants_state_moved(tmp_path, monkeypatch):
    """The checkpoint keeps participant-state-dir, so an unmoved resume is silent and a moved one names both places."""
    warnings = []
    monkeypatch.setattr(ckpt, "log", lambda level, message, *args: warnings.append(message % args))
    config = RunConfig.from_mapping({"output-dir": str(tmp_path), "participant-state-dir": "/state/a", "resume": True})
    checkpoint = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, config).parent)
    ckpt.warn_if_state_moved(checkpoint, config)
    assert warnings == []
    ckpt.warn_if_state_moved(checkpoint, config.with_outputs(participant_state_dir="/state/b"))
    assert len(warnings) == 1 and "'/state/b'" in warnings[0] and "'/state/a'" in warnings[0]


def test_under_a_schedule_a_resume_cannot_change_the_run_length(tmp_path):
    """A cosine run's past rates came from its length: resuming it longer is a one-line error; a constant one extends."""
    for schedule in ("cosine", "constant"):
        out = tmp_path / schedule
        out.mkdir()
        overrides = {"output-dir": str(out), "resume": True, "learning-rate-schedule": schedule, "num-server-rounds": 4}
        ckpt.save_checkpoint(out, 4, {"w": torch.zeros(2)}, RunConfig.from_mapping(overrides))
        assert ckpt.resume_state(RunConfig.from_mapping(overrides))["round"] == 4
        longer = RunConfig.from_mapping({**overrides, "num-server-rounds": 6})
        if schedule == "constant":
            assert ckpt.resume_state(longer)["round"] == 4
            continue
        with pytest.raises(ConfigError) as info:
            ckpt.resume_state(longer)
        message = str(info.value)
        assert "'num-server-rounds'" in message and "'cosine'" in message and "\n" not in message
