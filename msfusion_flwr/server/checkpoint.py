"""Checkpoint and resume of the server's run state.

Every ``checkpoint-every`` rounds (after the round's metrics row is written)
the server writes ``<output-dir>/checkpoint.pt``: the global model, the round,
the RNG states (python, numpy, torch), the coverage masks, the strategy's node profiles (kept for
inspection; a restarted run queries its nodes again, as node ids may change),
the reporter's cumulative cost totals and the resolved run config. Every write
is atomic: a temporary file in the same folder, flushed and fsynced, then
``os.replace``'d over the final name, so a crash leaves either the previous
checkpoint or the new one, never a partial file.

``resume = true`` continues from that checkpoint (see :func:`resume_state`), also
to a larger ``num-server-rounds``: the final round is always checkpointed, so a
finished run can be extended.

Participants keep their own state (the contrastive loss's previous
sub-model) in :mod:`msfusion_flwr.device.state`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.supercore import log

from ..config import RUN_LENGTH, ConfigError, RunConfig, run_identity, section, with_defaults
from ..storage import atomic_save

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = 1


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


def save_checkpoint(
    output_dir: str | Path,
    server_round: int,
    global_state: Mapping[str, torch.Tensor],
    run: RunConfig,
    profiles: Mapping[int, Any] | None = None,
    cumulative_totals: Mapping[int, Mapping[str, float]] | None = None,
    coverage: Mapping[str, torch.Tensor] | None = None,
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
        "coverage": {k: v.clone() for k, v in (coverage or {}).items()},
        "config": run.to_dict(),
    }
    return atomic_save(payload, Path(output_dir) / CHECKPOINT_FILE)


def load_checkpoint(output_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint in ``output_dir``, or None when there is none."""
    path = Path(output_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return torch.load(path, weights_only=True)


def resume_state(run: RunConfig) -> dict[str, Any] | None:
    """The checkpoint to continue from when ``resume`` is set, after checking the config.

    None when ``resume`` is false or ``output-dir`` holds no checkpoint (the run
    then starts from scratch). Raises :class:`ConfigError` (one line naming
    'resume') when the config differs from the checkpointed run's in a key that
    says what the run computes (:func:`~msfusion_flwr.config.run_identity`), and
    one naming 'num-server-rounds' when that is below the checkpoint's round, or
    differs from the checkpointed run's under a learning-rate schedule (the rates
    of the rounds already run would have been others).
    """
    if not run.outputs.resume:
        return None
    checkpoint = load_checkpoint(run.outputs.output_dir)
    if checkpoint is None:
        return None
    stored_config = with_defaults(checkpoint["config"])
    stored = run_identity(stored_config)
    current = run_identity(run.to_dict())
    changed = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ConfigError(
            f"config key 'resume': the run config differs from the checkpointed run in "
            f"{run.outputs.output_dir} ({details})"
        )
    if run.federation.num_server_rounds < int(checkpoint["round"]):
        raise ConfigError(
            f"config key '{RUN_LENGTH}': {run.federation.num_server_rounds} is below round {checkpoint['round']} of "
            f"the checkpoint in {run.outputs.output_dir}; a resume continues a run, it cannot shorten it"
        )
    stored_rounds = int(stored_config[RUN_LENGTH])
    if run.local.learning_rate_schedule != "constant" and run.federation.num_server_rounds != stored_rounds:
        raise ConfigError(
            f"config key '{RUN_LENGTH}': {run.federation.num_server_rounds} differs from the checkpointed run's "
            f"{stored_rounds} in {run.outputs.output_dir}, and learning-rate-schedule "
            f"{run.local.learning_rate_schedule!r} sets every round's rate from the run's length"
        )
    return checkpoint


def warn_if_state_moved(checkpoint: Mapping[str, Any], run: RunConfig) -> None:
    """Log a warning when the resumed run's participants keep their state elsewhere than the checkpointed run's."""
    before = section(with_defaults(checkpoint["config"]), "outputs").participant_state_dir
    if before != run.outputs.participant_state_dir:
        log(WARNING, "resume: participant-state-dir is now %r (was %r); participants continue from the state "
            "files found there", run.outputs.participant_state_dir, before)
