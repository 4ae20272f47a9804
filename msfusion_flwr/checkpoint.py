"""Checkpoint and resume: the server's run state, and the participants' previous sub-models.

Every ``checkpoint-every`` rounds (after the round's metrics row is written)
the server writes ``<output-dir>/checkpoint.pt``: the global model, the round,
the RNG states (python, numpy, torch), the strategy's node profiles (kept for
inspection; a restarted run queries its nodes again, as node ids may change),
the reporter's cumulative cost totals and the resolved run config. Every write
is atomic: a temporary file in the same folder, flushed and fsynced, then
``os.replace``'d over the final name, so a crash leaves either the previous
checkpoint or the new one, never a partial file.

``resume = true`` continues from that checkpoint (see :func:`resume_state`).

A participant's previous sub-model (the contrastive loss's ``z_p``) lives in
Flower's ``Context.state``, which a restarted run starts empty. With
``participant-state-dir`` set, participants also keep it in
``<participant-state-dir>/partition-<id>.pt`` (see
:func:`save_participant_state`), so the first resumed round trains exactly as
the uninterrupted run's did.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, with_defaults

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1
IGNORED_ON_RESUME = ("resume", "output-dir")
"""Config keys that may differ between the checkpointed run and the resumed one (the run to
continue is the one in output-dir, however its path is spelled)."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def rng_states() -> dict[str, Any]:
    """The process's python, numpy (global) and torch RNG states, in plain types."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": np.array(n["key"], dtype=np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(states["torch"])


def comparable(config: Mapping[str, Any], ignore: Iterable[str] = IGNORED_ON_RESUME) -> dict[str, Any]:
    """A config as JSON would store it, without the keys in ``ignore`` (by default those a resume may change)."""
    ignored = set(ignore)
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if k not in ignored}


def save_checkpoint(
    output_dir: str | Path,
    server_round: int,
    global_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    profiles: Mapping[int, Any] | None = None,
    cumulative_totals: Mapping[int, Mapping[str, float]] | None = None,
) -> Path:
    """Write ``<output_dir>/checkpoint.pt`` atomically (state after ``server_round``)."""
    payload = {
        "format": FORMAT,
        "round": int(server_round),
        "global_model": {k: v.detach().clone() for k, v in global_state.items()},
        "rng": rng_states(),
        "profiles": {
            int(node): {"partition_id": int(p.partition_id), "split_ratio": p.split_ratio}
            for node, p in (profiles or {}).items()
        },
        "cumulative_totals": {int(p): dict(t) for p, t in (cumulative_totals or {}).items()},
        "config": comparable(config),
    }
    return atomic_save(payload, Path(output_dir) / CHECKPOINT_FILE)


def load_checkpoint(output_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``output_dir``, or None when there is none."""
    path = Path(output_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True)


def resume_state(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint to continue from when ``resume`` is set, after checking the config.

    None when ``resume`` is false or ``output-dir`` holds no checkpoint (the run
    then starts from scratch). Raises :class:`ConfigError` (one line naming
    'resume') when the resolved config differs from the checkpointed run's in
    any key but ``resume``.
    """
    if not config.get("resume"):
        return None
    checkpoint = load_checkpoint(config["output-dir"])
    if checkpoint is None:
        return None
    stored = comparable(with_defaults(checkpoint["config"]))
    current = comparable(config)
    changed = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(
            f"config key 'resume': the run config differs from the checkpointed run in "
            f"{config['output-dir']} ({details})"
        )
    return checkpoint


def run_fingerprint(config: Mapping[str, Any]) -> str:
    """A short hash of the run config (``resume`` left out): tags participant state files."""
    text = json.dumps(comparable(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- participants ----------------------------------------------------------


def participant_state_path(state_dir: str | Path, partition_id: int) -> Path:
    return Path(state_dir) / f"partition-{int(partition_id)}.pt"


def _read_entries(path: Path, tag: str) -> dict[int, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        stored = torch.load(path, weights_only=True)
    except Exception:  # unreadable: as if absent
        return {}
    if stored.get("tag") != tag:
        return {}
    return {int(r): e for r, e in stored["entries"].items()}


def save_participant_state(
    state_dir: str | Path,
    partition_id: int,
    tag: str,
    server_round: int,
    arrays: Mapping[str, torch.Tensor],
    plan: Mapping[str, Any],
    rate: float,
    checkpoint_every: int = 0,
) -> Path:
    """Keep this participant's sub-model of ``server_round`` on disk, atomically.

    The file holds a few rounds: this one, the ones after the latest checkpoint
    the server can have written while this round trains, and the newest one
    at or before that checkpoint (what a resume from it needs). Entries of
    rounds >= ``server_round`` (an abandoned, interrupted timeline) are dropped.
    """
    path = participant_state_path(state_dir, partition_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {r: e for r, e in _read_entries(path, tag).items() if r < server_round}
    last_checkpoint = (server_round - 1) // checkpoint_every * checkpoint_every if checkpoint_every > 0 else server_round - 1
    older = [r for r in entries if r <= last_checkpoint]
    keep = {r for r in entries if r > last_checkpoint} | ({max(older)} if older else set())
    entries = {r: entries[r] for r in sorted(keep)}
    entries[int(server_round)] = {
        "arrays": {k: v.detach().clone() for k, v in arrays.items()},
        "plan": dict(plan),
        "rate": float(rate),
    }
    return atomic_save({"tag": tag, "entries": entries}, path)


def load_participant_state(
    state_dir: str | Path, partition_id: int, tag: str, server_round: int
) -> tuple[int, dict[str, Any]] | None:
    """``(round, entry)``: the newest kept sub-model of a round before ``server_round``, if any."""
    entries = _read_entries(participant_state_path(state_dir, partition_id), tag)
    earlier = [r for r in entries if r < server_round]
    if not earlier:
        return None
    r = max(earlier)
    return r, entries[r]
