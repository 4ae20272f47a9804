"""A participant's previous sub-model: the contrastive loss's ``z_p``, kept across rounds.

It lives in Flower's ``Context.state`` (as ``msfusion.previous-*`` records),
which a restarted run starts empty. With ``participant-state-dir`` set, the
participant keeps it in ``<participant-state-dir>/partition-<id>.pt`` instead
(atomically, tagged with the run's fingerprint; read back into
``Context.state`` for the round that needs it and dropped from it again), so
that the first round of a resumed run trains exactly as the uninterrupted
run's did, and a simulation, whose driver process holds every simulated
node's Context, does not hold one sub-model per partition that has trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..engine.slicing import plan_widths
from ..protocol import SPLIT_RATE, TrainInstructions, decode_plan, encode_plan
from ..storage import atomic_save
from .losses import Representation, representation

PREVIOUS_ARRAYS = "msfusion.previous-arrays"
PREVIOUS_PLAN = "msfusion.previous-plan"
PREVIOUS_CONFIG = "msfusion.previous-config"


def previous_representation(state: RecordDict, make_model: Callable[..., torch.nn.Module]) -> Representation | None:
    """The participant's sub-model of its previous round, frozen, if it kept one."""
    if PREVIOUS_ARRAYS not in state.array_records:
        return None
    plan, widths = decode_plan(state.config_records[PREVIOUS_PLAN])
    rate = float(state.config_records[PREVIOUS_CONFIG][SPLIT_RATE])  # type: ignore[arg-type]
    model = make_model(plan_widths(plan), rate)
    model.load_state_dict(state.array_records[PREVIOUS_ARRAYS].to_torch_state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    return representation(model, plan, widths)


def keep_as_previous(
    state: RecordDict, model: torch.nn.Module, plan: Mapping[str, torch.Tensor], widths: Mapping[str, int], rate: float
) -> None:
    """Keep ``model`` (this round's trained sub-model) in ``Context.state`` for the next round."""
    state[PREVIOUS_ARRAYS] = ArrayRecord(model.state_dict())
    state[PREVIOUS_PLAN] = encode_plan(plan, widths)
    state[PREVIOUS_CONFIG] = ConfigRecord({SPLIT_RATE: rate})


def restore_previous(state: RecordDict, run: TrainInstructions, partition_id: int) -> None:
    """Fill Context.state's previous sub-model from ``participant-state-dir`` when it lacks one."""
    if not run.participant_state_dir or PREVIOUS_ARRAYS in state.array_records:
        return
    found = load_participant_state(run.participant_state_dir, partition_id, run.state_tag, run.server_round)
    if found is None:
        return
    _, entry = found
    state[PREVIOUS_ARRAYS] = ArrayRecord(entry["arrays"])
    state[PREVIOUS_PLAN] = ConfigRecord(entry["plan"])
    state[PREVIOUS_CONFIG] = ConfigRecord({SPLIT_RATE: float(entry["rate"])})


def persist_previous(state: RecordDict, run: TrainInstructions, partition_id: int) -> None:
    """Move Context.state's previous sub-model to ``participant-state-dir`` (if set), atomically: written there,
    dropped from Context.state (:func:`restore_previous` reads it back next time)."""
    if not run.participant_state_dir:
        return
    save_participant_state(
        run.participant_state_dir,
        partition_id,
        run.state_tag,
        run.server_round,
        state.array_records[PREVIOUS_ARRAYS].to_torch_state_dict(),
        dict(state.config_records[PREVIOUS_PLAN]),
        float(state.config_records[PREVIOUS_CONFIG][SPLIT_RATE]),  # type: ignore[arg-type]
        run.checkpoint_every,
    )
    for key in (PREVIOUS_ARRAYS, PREVIOUS_PLAN, PREVIOUS_CONFIG):
        del state[key]


# --------------------------------------------------------------------------- files


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
