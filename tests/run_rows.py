"""Shared by the tests that compare two runs: metrics rows without wall-clock measurements."""

from __future__ import annotations

from typing import Any

TIMING = ("wall_s", "elapsed_s", "train_time_s", "time_s", "server_s")


def strip_timing(value: Any) -> Any:
    """Rows without wall-clock measurements (and FedDF's timed server costs)."""
    if isinstance(value, dict):
        return {k: strip_timing(v) for k, v in value.items() if not any(t in k for t in TIMING) and k != "server_costs"}
    if isinstance(value, list):
        return [strip_timing(v) for v in value]
    return value
