"""Checking replies before they may touch the global model, and their training metrics."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from ..protocol import ARRAYS, METRICS, WEIGHT_KEY

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


def check_reply(reply: Message, expected: Mapping[str, tuple[tuple[int, ...], str]]) -> str | None:
    """Why ``reply`` must be left out, or None when it matches the plan sent.

    ``expected``: array name -> (shape, numpy dtype name) of what was sent.
    """
    if reply.has_error():
        return f"error reply ({error_summary(reply.error.reason)})"
    content = reply.content
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        return f"reply lacks '{ARRAYS}' or '{METRICS}'"
    arrays, metrics = content.array_records[ARRAYS], content.metric_records[METRICS]
    if set(arrays) != set(expected):
        return "array names differ from the plan sent"
    for key, array in arrays.items():
        shape, dtype = expected[key]
        if tuple(array.shape) != shape:
            return f"{key} has shape {tuple(array.shape)}, expected {shape}"
        if str(array.dtype) != dtype:
            return f"{key} has dtype {array.dtype}, expected {dtype}"
        if not torch.isfinite(torch.from_numpy(array.numpy())).all():
            return f"{key} has non-finite values"
    count = metrics.get(WEIGHT_KEY)
    if not isinstance(count, int | float) or not count > 0:
        return f"{WEIGHT_KEY} must be positive, got {count!r}"
    return None


def training_metrics(replies: Sequence[Message]) -> MetricRecord:
    """Example-weighted mean of the replies' training metrics (partition ids left out)."""
    records = [
        RecordDict({METRICS: MetricRecord({k: v for k, v in r.content[METRICS].items() if k != "partition-id"})})
        for r in replies
    ]
    return aggregate_metricrecords(records, WEIGHT_KEY)
