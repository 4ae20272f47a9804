"""What travels between ServerApp and ClientApp, and how it is counted.

A train message carries

* ``arrays`` (ArrayRecord): the sub-model's sliced tensors, nothing full-size;
* ``config`` (ConfigRecord): local-training and data settings, ``server-round``
  and ``split-rate`` (the Scaler's rate);
* ``plan`` (ConfigRecord, absent for full-model methods): for every width group
  ``index.<group>`` (the global units held, in window order) and
  ``width.<group>`` (the group's full width K), enough to build the narrow model
  and to place its features in the global feature space.

The reply carries ``arrays`` (the trained sub-model) and ``metrics``
(MetricRecord with ``num-examples``, losses, ``partition-id``, timing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

ARRAYS, CONFIG, PLAN, METRICS = "arrays", "config", "plan", "metrics"

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
    "contrastive-weight",
    "contrastive-temperature",
    "classifier-scaler",
    "dropout-rate",
    "straggler-rate",
    "round-timeout",
    "checkpoint-every",
    "participant-state-dir",
)
"""Run-config keys a ClientApp needs; the ServerApp sends them every round."""


def client_config(config: Mapping[str, Any]) -> ConfigRecord:
    """The part of a resolved run config that participants need.

    Only MSfusion trains with the contrastive term; every other method sends
    ``contrastive-weight = 0`` (plain cross-entropy).
    """
    record = ConfigRecord({key: config[key] for key in CLIENT_KEYS})
    if config["method"] != "msfusion":
        record["contrastive-weight"] = 0.0
    return record


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
