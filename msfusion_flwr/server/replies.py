"""Checking replies before they may touch the global model, and their training metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from ..protocol import ARRAYS, METRICS, WEIGHT_KEY


def check_reply(reply: Message, expected: Mapping[str, tuple[tuple[int, ...], str]]) -> str | None:
    """Why ``reply`` must be left out, or None when it matches the plan sent.

    ``expected``: array name -> (shape, numpy dtype name) of what was sent.
    """
    if reply.has_error():
        return f"error reply ({reply.error.reason})"
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
