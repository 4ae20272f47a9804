"""Checking replies before they may touch the global model, and their training metrics."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from ..data import one_line
from ..protocol import ARRAYS, METRICS, WEIGHT_KEY, message_array_bytes

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.MULTILINE)
FLOWER_REASON = re.compile(r"^<class '([\w.()]+)'>:<'(.*)'>$", re.DOTALL)
WRAPPERS = ("ClientAppException", "RayTaskError")
"""Exceptions Flower and Ray wrap a ClientApp's exception in; the summary names the one inside."""


def error_summary(reason: str, limit: int = 300) -> str:
    """One line for an error reply's reason: the ClientApp's own exception, ``Type: message``.

    Flower reports a ClientApp's exception as ``<class 'T'>:<'message'>``; in
    simulation T is Ray's ``RayTaskError(ClientAppException)`` and the message
    holds whole tracebacks. The summary is the first (innermost) exception line
    of those tracebacks that is not one of the wrappers, with the module path
    dropped from its type; else Flower's type and message; else the reason,
    whitespace collapsed. At most ``limit`` characters.
    """
    text = ANSI.sub("", reason).strip()
    summary = " ".join(text.split())
    for name, message in EXCEPTION_LINE.findall(text):
        short = name.rsplit(".", 1)[-1]
        if short not in WRAPPERS and not short.startswith("RayTaskError"):
            summary = f"{short}: {' '.join(message.split())}"
            break
    else:
        flower = FLOWER_REASON.match(text)
        if flower:
            short, message = flower.group(1).rsplit(".", 1)[-1], " ".join(flower.group(2).split())
            message = message.removeprefix(f"Exception {short} occurred. Message: ")
            summary = f"{short}: {message}" if message else short
    return summary if len(summary) <= limit else summary[: limit - 3] + "..."


@dataclass(frozen=True)
class MetricRule:
    """What the server accepts for one training metric of a reply: a finite number, maybe whole, at least ``minimum``."""

    required: bool = False
    integer: bool = False
    minimum: float = -math.inf


TRAIN_METRICS: dict[str, MetricRule] = {
    WEIGHT_KEY: MetricRule(required=True, integer=True, minimum=1),
    "partition-id": MetricRule(required=True, integer=True, minimum=0),
    "train-loss": MetricRule(required=True),
    "train-ce": MetricRule(minimum=0),
    "train-contrastive": MetricRule(),
    "train-codistill": MetricRule(minimum=0),
    "train-steps": MetricRule(integer=True, minimum=0),
    "train-time-s": MetricRule(minimum=0),
    "handler-time-s": MetricRule(minimum=0),
    "trained-params": MetricRule(integer=True, minimum=0),
    "train-flops": MetricRule(minimum=0),
    "peak-memory-bytes": MetricRule(minimum=0),
}
"""Every reply metric the server reads (accounting, logs, the aggregated training metrics); others are ignored."""


def check_metrics(metrics: MetricRecord, partition_id: int | None = None, max_examples: float = math.inf) -> str | None:
    """Why a reply's training metrics must be left out, or None.

    Each metric of :data:`TRAIN_METRICS` present must be a finite number
    (``int`` or ``float``, not a list) that satisfies its rule; the example
    count may not exceed ``max_examples`` (the run's training examples, when
    the server knows them), and ``partition-id`` must be the one the node
    declared (``partition_id``, when known).
    """
    for name, rule in TRAIN_METRICS.items():
        if name not in metrics:
            if rule.required:
                return f"metrics lack '{name}'"
            continue
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric '{name}' must be a number, got {type(value).__name__}"
        if not math.isfinite(value):
            return f"metric '{name}' is not finite ({value!r})"
        if rule.integer and value != int(value):
            return f"metric '{name}' must be a whole number, got {value!r}"
        if value < rule.minimum:
            return f"metric '{name}' must be at least {rule.minimum:g}, got {value!r}"
    if metrics[WEIGHT_KEY] > max_examples:
        return f"{WEIGHT_KEY} {metrics[WEIGHT_KEY]:g} exceeds the run's {max_examples:g} training examples"
    if partition_id is not None and int(metrics["partition-id"]) != partition_id:
        return f"partition-id {int(metrics['partition-id'])} is not the node's ({partition_id})"
    return None


def check_reply(
    reply: Message,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    partition_id: int | None = None,
    max_examples: float = math.inf,
) -> str | None:
    """Why ``reply`` must be left out, or None when it matches the plan sent and its metrics pass :func:`check_metrics`.

    ``expected``: array name -> (shape, numpy dtype name) of what was sent.
    Never raises: a reply that cannot even be read is left out with the reason.
    """
    return read_reply(reply, expected, partition_id, max_examples)[1]


def read_reply(
    reply: Message,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    partition_id: int | None = None,
    max_examples: float = math.inf,
) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """:func:`check_reply`, and the reply's arrays as tensors when it passes: (tensors, None) or (None, why).

    Each array is decoded once, for the check and for fusion (decoding is most
    of what checking a large reply costs).
    """
    try:
        return _read_reply(reply, expected, partition_id, max_examples)
    except Exception as exc:  # a malformed reply must not take the server down
        return None, f"unreadable reply ({one_line(exc)})"


def _read_reply(
    reply: Message, expected: Mapping[str, tuple[tuple[int, ...], str]], partition_id: int | None, max_examples: float
) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    if reply.has_error():
        return None, f"error reply ({error_summary(reply.error.reason)})"
    content = reply.content
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        return None, f"reply lacks '{ARRAYS}' or '{METRICS}'"
    arrays, metrics = content.array_records[ARRAYS], content.metric_records[METRICS]
    if set(arrays) != set(expected):
        return None, "array names differ from the plan sent"
    tensors = {}
    for key, array in arrays.items():
        shape, dtype = expected[key]
        if tuple(array.shape) != shape:
            return None, f"{key} has shape {tuple(array.shape)}, expected {shape}"
        if str(array.dtype) != dtype:
            return None, f"{key} has dtype {array.dtype}, expected {dtype}"
        tensors[key] = torch.from_numpy(array.numpy())
        if not torch.isfinite(tensors[key]).all():
            return None, f"{key} has non-finite values"
    reason = check_metrics(metrics, partition_id, max_examples)
    return (None, reason) if reason else (tensors, None)


@dataclass(frozen=True)
class ReplySummary:
    """What the server keeps of an accepted reply once its arrays are fused: its node, metrics and array bytes."""

    node: int
    metrics: MetricRecord
    bytes_up: int

    @classmethod
    def of(cls, reply: Message) -> ReplySummary:
        return cls(reply.metadata.src_node_id, reply.content[METRICS], message_array_bytes(reply))


def training_metrics(replies: Sequence[ReplySummary]) -> MetricRecord:
    """Example-weighted mean of the replies' training metrics (:data:`TRAIN_METRICS` only, partition ids left out)."""
    records = [
        RecordDict({METRICS: MetricRecord({k: v for k, v in r.metrics.items() if k in TRAIN_METRICS and k != "partition-id"})})
        for r in replies
    ]
    return aggregate_metricrecords(records, WEIGHT_KEY)
