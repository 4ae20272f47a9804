"""Run outputs: config.json, metrics.jsonl, the final global model and curves.png.

Every run writes to its output directory:

* ``config.json``: the resolved run config;
* ``metrics.jsonl``: one JSON object per round (round 0 is the initial model)
  with ``round``, ``accuracy`` and ``loss`` of the global model when evaluated,
  ``perplexity`` (``exp(loss)`` for language-model runs, where ``loss`` is the
  mean token negative log-likelihood and ``accuracy`` the next-token accuracy;
  null for image classification and on rounds not evaluated; absent from rows
  written before it existed, which read as null),
  ``participants`` (partition ids), ``bytes_down``/``bytes_up`` (array bytes
  actually sent and received), ``train_loss``, ``failures``, ``wall_s`` (the
  round's wall time) and ``elapsed_s``; per-participant measured costs
  (``per_participant``), their per-round sums and maxima and their cumulative
  totals (see :func:`summarize_costs` and :class:`CumulativeCosts`), and
  ``server_costs``, the server's own training in the round (FedDF's
  ``distill_time_s`` and ``distill_flops``; empty for other methods);
* ``global_model.pt``: the final global model's state dict;
* ``checkpoint.pt``: with ``checkpoint-every`` > 0, the state to resume from
  (see :mod:`msfusion_flwr.server.checkpoint`);
* ``curves.png``: accuracy (perplexity, on a log scale, for language-model
  runs) and loss of the global model against the round.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from datetime import datetime
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.supercore import log

from ..config import RunConfig

METRICS_FILE, CONFIG_FILE, MODEL_FILE, CURVES_FILE = "metrics.jsonl", "config.json", "global_model.pt", "curves.png"


def default_output_dir(method: str) -> str:
    """``outputs/<timestamp>-<method>`` (relative to the working directory)."""
    return str(Path("outputs") / f"{datetime.now():%Y%m%d-%H%M%S}-{method}")


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    lines = (Path(output_dir) / METRICS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


TIMED_COLUMNS = ("wall_s", "elapsed_s", "train_time_s", "time_s", "server_s", "server_costs")
"""Metrics columns (and parts of column names) that hold wall-clock measurements, so differ between equal runs."""


def without_timing(value: Any, left_out: tuple[str, ...] = ()) -> Any:
    """Metrics rows (or any JSON value) without the timed columns and without columns starting with ``left_out``.

    What stays is deterministic: two runs of one config on one machine give equal results.
    """
    if isinstance(value, dict):
        return {
            key: without_timing(item, left_out)
            for key, item in value.items()
            if not any(timed in key for timed in TIMED_COLUMNS) and not key.startswith(left_out)
        }
    if isinstance(value, list):
        return [without_timing(item, left_out) for item in value]
    return value


SUMMED_COSTS = ("bytes_down", "bytes_up", "flops", "train_time_s", "handler_time_s")
"""Costs that add up over participants and rounds."""
PEAK_COSTS = ("trained_params", "peak_memory_bytes")
"""Costs of which only the per-round maximum over participants is meaningful."""


def summarize_costs(costs: list[dict[str, float]]) -> dict[str, float]:
    """Per-round aggregates of the accepted participants' costs.

    ``<cost>_sum`` over participants (summed costs only) and ``<cost>_max``,
    the largest participant's. (The row's ``bytes_down`` also counts messages
    sent to participants whose reply was left out; ``bytes_down_sum`` does not.)
    """
    summary: dict[str, float] = {}
    for key in SUMMED_COSTS + PEAK_COSTS:
        values = [c[key] for c in costs if not math.isnan(c[key])]
        if key in SUMMED_COSTS:
            summary[f"{key}_sum"] = sum(values)
        summary[f"{key}_max"] = max(values, default=0.0)
    return summary


class CumulativeCosts:
    """Running per-participant totals of the summed costs.

    ``cum_<cost>``: total over all participants and rounds so far;
    ``cum_<cost>_per_participant_max``: the largest single participant's total,
    the figure to set beside accuracy when devices have a budget.
    """

    def __init__(self) -> None:
        self.totals: dict[int, dict[str, float]] = {}

    def add(self, costs: list[dict[str, float]]) -> dict[str, float]:
        for cost in costs:
            mine = self.totals.setdefault(int(cost["partition_id"]), dict.fromkeys(SUMMED_COSTS, 0.0))
            for key in SUMMED_COSTS:
                if not math.isnan(cost[key]):
                    mine[key] = mine.get(key, 0.0) + cost[key]  # .get: totals from a checkpoint of an older revision
        out = {}
        for key in SUMMED_COSTS:
            per_participant = [t.get(key, 0.0) for t in self.totals.values()]
            out[f"cum_{key}"] = sum(per_participant)
            out[f"cum_{key}_per_participant_max"] = max(per_participant, default=0.0)
        return out


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


class RunReporter:
    """Writes one run's outputs as the run goes."""

    def __init__(
        self,
        output_dir: str | Path,
        run: RunConfig,
        resume_round: int | None = None,
        cumulative_totals: Mapping[int, Mapping[str, float]] | None = None,
    ) -> None:
        """Start a run's outputs; or, with ``resume_round``, continue them after that round.

        config.json gets ``run`` either way (a resume may have raised
        ``num-server-rounds`` or moved the run). Resuming keeps the metrics.jsonl
        rows of rounds up to ``resume_round`` (later ones came from the
        interrupted run) and restarts the cumulative costs from ``cumulative_totals``.
        """
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.num_rounds = run.federation.num_server_rounds
        self.cumulative = CumulativeCosts()
        self._start = time.perf_counter()
        metrics = self.output_dir / METRICS_FILE
        (self.output_dir / CONFIG_FILE).write_text(json.dumps(run.to_dict(), indent=2, sort_keys=True) + "\n")
        if resume_round is None:
            metrics.write_text("")
        else:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            kept = [line for line in lines if line.strip() and json.loads(line)["round"] <= resume_round]
            metrics.write_text("".join(line + "\n" for line in kept))
            self.cumulative.totals = {int(p): dict(t) for p, t in (cumulative_totals or {}).items()}
            if kept:
                self._start -= float(json.loads(kept[-1]).get("elapsed_s", 0.0))
        log(INFO, "Writing run outputs to %s", self.output_dir)

    def record_round(self, row: dict[str, Any]) -> None:
        """Append one round's row (with cost aggregates) to metrics.jsonl; log one line."""
        costs = row.get("per_participant", [])
        row.update(summarize_costs(costs))
        row.update(self.cumulative.add(costs))
        row["elapsed_s"] = time.perf_counter() - self._start
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        log(INFO, "%s", round_line(row, self.num_rounds))

    def save_model(self, state: Mapping[str, torch.Tensor]) -> Path:
        """Save the final global model's state dict."""
        path = self.output_dir / MODEL_FILE
        torch.save(dict(state), path)
        return path

    def plot_curves(self) -> Path:
        """Accuracy (perplexity for language models) and loss of the evaluated rounds, as curves.png."""
        return plot_curves(read_metrics(self.output_dir), self.output_dir / CURVES_FILE)


def plot_curves(rows: list[Mapping[str, Any]], path: str | Path) -> Path:
    """Plot a run's metrics rows to ``path``: accuracy and loss of the evaluated rounds.

    A language-model run (one whose rows have a ``perplexity``) shows
    perplexity, on a logarithmic axis, instead of accuracy.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    language_model = any(r.get("perplexity") is not None for r in rows)
    metric = "perplexity" if language_model else "accuracy"
    rows = [r for r in rows if r.get(metric) is not None]
    fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [r["round"] for r in rows]
    ax_metric.plot(rounds, [r[metric] for r in rows], marker="o")
    ax_metric.set(xlabel="round", ylabel=f"test {metric}", title=f"global model {metric}")
    if language_model:
        ax_metric.set_yscale("log")
    ax_loss.plot(rounds, [r["loss"] for r in rows], marker="o", color="tab:red")
    ax_loss.set(xlabel="round", ylabel="test loss", title="global model loss")
    for ax in (ax_metric, ax_loss):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def round_line(row: Mapping[str, Any], num_rounds: int) -> str:
    """The one log line of a round."""
    parts = [f"round {row['round']}/{num_rounds}"]
    if row.get("accuracy") is not None:
        parts.append(f"acc {row['accuracy']:.4f} loss {row['loss']:.4f}")
    if row.get("perplexity") is not None:
        parts.append(f"ppl {row['perplexity']:.2f}")
    if row["round"] > 0:
        train_loss = row.get("train_loss")
        if train_loss is not None and not math.isnan(train_loss):
            parts.append(f"train loss {train_loss:.4f}")
        parts.append(f"{len(row['participants'])} participants")
        parts.append(f"down {_megabytes(row['bytes_down'])} up {_megabytes(row['bytes_up'])}")
        if row["failures"]:
            parts.append(f"{len(row['failures'])} left out")
    parts.append(f"{row['wall_s']:.1f} s")
    return " | ".join(parts)
