"""What travels between ServerApp and ClientApp, and how it is counted.

A train message carries

* ``arrays`` (ArrayRecord): the sub-model's sliced tensors, nothing full-size;
* ``config`` (ConfigRecord): the run-config keys a participant needs
  (:data:`CLIENT_KEYS`), plus ``server-round``, ``split-rate`` (the Scaler's
  rate) and ``state-tag`` (the run's fingerprint, tagging participant state
  files); the participant reads it back as a typed :class:`TrainInstructions`;
* ``plan`` (ConfigRecord, absent for full-model methods): for every width group
  ``index.<group>`` (the global units held, in window order) and
  ``width.<group>`` (the group's full width K), enough to build the narrow model
  and to place its features in the global feature space.

The reply carries ``arrays`` (the trained sub-model) and ``metrics``
(MetricRecord with ``num-examples``, losses, ``partition-id``, timing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from .config import FaultSettings, PrivacySettings, RunConfig, TrainSettings, section
from .data import DataSettings
from .models import ModelSettings

ARRAYS, CONFIG, PLAN, METRICS = "arrays", "config", "plan", "metrics"
WEIGHT_KEY = "num-examples"
"""Reply metric: the participant's number of training examples, its weight in fusion."""
SERVER_ROUND, SPLIT_RATE, STATE_TAG = "server-round", "split-rate", "state-tag"
"""Config-record entries the server adds to the run-config keys of a train message."""

CLIENT_KEYS = (
    "model",
    "dataset",
    "data-dir",
    "partitioner",
    "dirichlet-alpha",
    "classes-per-partition",
    "data-fraction",
    "server-data-fraction",
    "seed",
    "seq-len",
    "train-split",
    "vocab-size",
    "local-epochs",
    "batch-size",
    "learning-rate",
    "momentum",
    "weight-decay",
    "optimizer",
    "torch-device",
    "contrastive-weight",
    "contrastive-temperature",
    "codistill-weight",
    "codistill-temperature",
    "output-scaling",
    "dropout-rate",
    "straggler-rate",
    "attack",
    "attack-fraction",
    "attack-scale",
    "dp-clip",
    "round-timeout",
    "checkpoint-every",
    "participant-state-dir",
)
"""Run-config keys a ClientApp needs; the ServerApp sends them every round."""


def client_config(run: RunConfig, server_round: int = 1) -> ConfigRecord:
    """The part of a run config that participants need in round ``server_round``, as a config record.

    ``learning-rate`` is the round's (``learning-rate-schedule``, applied here so
    that a participant trains at what it is sent). Only MSfusion trains with the
    contrastive term and codistillation; every other method sends
    ``contrastive-weight = codistill-weight = 0`` (plain cross-entropy). The
    state tag is the run's fingerprint.
    """
    local = run.local.at_round(server_round, run.federation.num_server_rounds)
    if run.method.name != "msfusion":
        local = dataclasses.replace(local, contrastive_weight=0.0, codistill_weight=0.0)
    flat = dataclasses.replace(run, local=local).to_dict()
    record = ConfigRecord({key: flat[key] for key in CLIENT_KEYS})
    record[STATE_TAG] = run.fingerprint()
    return record


@dataclass(frozen=True)
class TrainInstructions:
    """A train message's config record, typed: everything a participant reads from it."""

    model: ModelSettings
    data: DataSettings
    local: TrainSettings
    faults: FaultSettings
    privacy: PrivacySettings
    round_timeout: float
    checkpoint_every: int
    participant_state_dir: str
    state_tag: str
    server_round: int
    split_rate: float

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainInstructions:
        """Read the record a server built with :func:`client_config` (values validated there)."""
        flat = dict(record)
        federation, outputs = section(flat, "federation"), section(flat, "outputs")
        return cls(
            model=section(flat, "model"),
            data=section(flat, "data"),
            local=section(flat, "local"),
            faults=section(flat, "faults"),
            privacy=section(flat, "privacy"),
            round_timeout=federation.round_timeout,
            checkpoint_every=outputs.checkpoint_every,
            participant_state_dir=outputs.participant_state_dir,
            state_tag=str(flat.get(STATE_TAG, "")),
            server_round=int(flat[SERVER_ROUND]),  # type: ignore[arg-type]
            split_rate=float(flat.get(SPLIT_RATE, 1.0)),  # type: ignore[arg-type]
        )


PROFILE = "profile"
"""Config record of a query reply: what a node tells the server about itself."""


def encode_profile(partition_id: int, num_partitions: int, split_ratio: float | None) -> RecordDict:
    """A query reply's content: the node's partition, and its own split-ratio budget if it has one."""
    profile = ConfigRecord({"partition-id": partition_id, "num-partitions": num_partitions})
    if split_ratio is not None:
        profile["split-ratio"] = float(split_ratio)
    return RecordDict({PROFILE: profile})


def decode_profile(content: RecordDict) -> tuple[int, float | None, int | None] | None:
    """``(partition id, split ratio or None, number of partitions or None)`` from a query reply's content.

    None if the content holds no profile.
    """
    if PROFILE not in content.config_records:
        return None
    profile = content.config_records[PROFILE]
    ratio, partitions = profile.get("split-ratio"), profile.get("num-partitions")
    return (
        int(profile["partition-id"]),  # type: ignore[arg-type]
        None if ratio is None else float(ratio),  # type: ignore[arg-type]
        None if partitions is None else int(partitions),  # type: ignore[arg-type]
    )


def encode_plan(plan: Mapping[str, torch.Tensor], full_widths: Mapping[str, int]) -> ConfigRecord:
    """Index plan and full group widths as a ConfigRecord."""
    record = ConfigRecord()
    for name, index in plan.items():
        record[f"index.{name}"] = [int(i) for i in index.tolist()]
        record[f"width.{name}"] = int(full_widths[name])
    return record


def decode_plan(record: ConfigRecord) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Inverse of :func:`encode_plan`: ``(plan, full widths)``."""
    plan, widths = {}, {}
    for key, value in record.items():
        kind, _, name = key.partition(".")
        if kind == "index":
            plan[name] = torch.tensor(value, dtype=torch.long)
        elif kind == "width":
            widths[name] = int(value)  # type: ignore[arg-type]
    return plan, widths


def array_bytes(record: ArrayRecord) -> int:
    """Bytes of the array data in an ArrayRecord (sum of the arrays' nbytes)."""
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values()))


def message_array_bytes(message: Message) -> int:
    """Array bytes of every ArrayRecord in a message's content."""
    content: RecordDict = message.content
    return sum(array_bytes(r) for r in content.array_records.values())
