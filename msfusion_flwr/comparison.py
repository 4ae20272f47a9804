"""Comparison harness: a matrix of runs, resumable, summarised as CSV, Markdown and plots.

A matrix file (TOML) holds

* ``[base]``: run-config values shared by every run;
* ``[variants]``: label -> run-config overrides (ablations); a label that is a
  method name needs no entry;
* ``[matrix]``: lists to take the product of: ``variant``, ``seed``,
  ``num-supernodes`` and any run-config key;
* ``[[points]]`` (optional): sets of values that go together (e.g. more
  participants with a smaller split ratio), multiplied with ``[matrix]``;
* ``target-accuracy`` (optional): for "rounds to reach".

Every run goes through :func:`msfusion_flwr.apps.run_experiment` (in-process
simulation) into ``<results>/runs/<run id>/``; a run whose metrics already
reach its last round with the same config is skipped, so an interrupted
comparison resumes where it stopped.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import shutil
import statistics
import threading
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import METHODS, resolve_config
from .reporting import CONFIG_FILE, METRICS_FILE, read_metrics

RUNS_DIR = "runs"
NON_CONFIG_AXES = ("variant", "num-supernodes")
PER_ROUND_COSTS = ("flops_max", "bytes_down_max", "bytes_up_max", "peak_memory_bytes_max", "trained_params_max", "train_time_s_max")
CUMULATIVE_COSTS = ("cum_flops_per_participant_max", "cum_bytes_down_per_participant_max", "cum_bytes_up_per_participant_max")


class MatrixError(ValueError):
    """An invalid matrix file; the message is one line."""


@dataclass(frozen=True)
class Matrix:
    """A parsed matrix file."""

    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    axes: dict[str, list[Any]]
    points: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    target_accuracy: float = 0.8


@dataclass(frozen=True)
class RunSpec:
    """One run of the matrix."""

    run_id: str
    variant: str
    num_supernodes: int
    config: dict[str, Any]
    labels: dict[str, Any]

    def output_dir(self, results_dir: Path) -> Path:
        return results_dir / RUNS_DIR / self.run_id


def load_matrix(path: str | Path) -> Matrix:
    """Parse and check a matrix file."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise MatrixError(f"cannot read matrix {path}: {error}") from None
    unknown = set(raw) - {"base", "variants", "matrix", "points", "target-accuracy"}
    if unknown:
        raise MatrixError(f"matrix {path}: unknown section(s) {sorted(unknown)}")
    axes = {k: v if isinstance(v, list) else [v] for k, v in raw.get("matrix", {}).items()}
    axes.setdefault("variant", ["msfusion"])
    axes.setdefault("num-supernodes", [10])
    matrix = Matrix(
        base=dict(raw.get("base", {})),
        variants={k: dict(v) for k, v in raw.get("variants", {}).items()},
        axes=axes,
        points=[dict(p) for p in raw.get("points", [{}])] or [{}],
        target_accuracy=float(raw.get("target-accuracy", 0.8)),
    )
    for variant in axes["variant"]:
        if variant not in matrix.variants and variant not in METHODS:
            raise MatrixError(f"matrix {path}: variant {variant!r} is neither a method nor in [variants]")
    return matrix


def _slug(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in text)


def expand(matrix: Matrix) -> list[RunSpec]:
    """Every run of the matrix, configs resolved (validated) up front."""
    names = list(matrix.axes)
    specs = []
    for values in itertools.product(*(matrix.axes[n] for n in names)):
        for point in matrix.points:
            labels = {**dict(zip(names, values, strict=True)), **point}
            variant = str(labels["variant"])
            overrides = {k: v for k, v in labels.items() if k not in NON_CONFIG_AXES}
            config = {**matrix.base, "method": variant, **matrix.variants.get(variant, {}), **overrides}
            num_supernodes = int(labels["num-supernodes"])
            config["min-available-nodes"] = num_supernodes
            varying = {k: v for k, v in labels.items() if k != "variant" and (len(matrix.axes.get(k, [])) > 1 or k in point)}
            run_id = "__".join([_slug(variant)] + [f"{_slug(k)}={_slug(v)}" for k, v in sorted(varying.items())])
            resolve_config(config)  # fail before any run starts
            specs.append(RunSpec(run_id, variant, num_supernodes, config, labels))
    ids = [s.run_id for s in specs]
    if len(set(ids)) != len(ids):
        raise MatrixError("matrix produces duplicate runs")
    return specs


def select(specs: Sequence[RunSpec], only: Iterable[str]) -> list[RunSpec]:
    """The specs whose labels match every ``key=value`` in ``only`` (e.g. ``seed=0``).

    Lets a long matrix be run in a chosen order (one seed of every variant
    first) or split across machines; run ids do not change, so the full matrix
    later skips what a selection finished.
    """
    wanted = {}
    for item in only:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MatrixError(f"--only {item!r}: expected key=value")
        if not any(key in spec.labels for spec in specs):
            raise MatrixError(f"--only {item!r}: {key!r} is not an axis of this matrix")
        wanted[key] = value
    return [s for s in specs if all(key in s.labels and _slug(s.labels[key]) == v for key, v in wanted.items())]


def is_complete(spec: RunSpec, results_dir: Path) -> bool:
    """Whether the run already finished with this exact config."""
    out = spec.output_dir(results_dir)
    try:
        stored = json.loads((out / CONFIG_FILE).read_text())
        rows = read_metrics(out)
    except (OSError, json.JSONDecodeError):
        return False
    expected = resolve_config(spec.config)
    same = {k: v for k, v in stored.items() if k != "output-dir"} == {k: v for k, v in expected.items() if k != "output-dir"}
    return same and bool(rows) and rows[-1]["round"] == expected["num-server-rounds"]


class _RoundWatcher(threading.Thread):
    """Advances a progress bar as a run appends rounds to its metrics.jsonl."""

    def __init__(self, metrics_path: Path, bar: Any) -> None:
        super().__init__(daemon=True)
        self.metrics_path, self.bar = metrics_path, bar
        self.seen = 0
        self.stop = threading.Event()

    def poll(self) -> None:
        try:
            rounds = sum(1 for line in self.metrics_path.read_text().splitlines() if line.strip()) - 1
        except OSError:
            return
        if rounds > self.seen:
            self.bar.update(rounds - self.seen)
            self.seen = rounds

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.poll()


def run_matrix(specs: Sequence[RunSpec], results_dir: Path, verbose: bool = False) -> list[RunSpec]:
    """Run every spec not complete yet; returns the ones that ran."""
    from tqdm.auto import tqdm

    from .apps import run_experiment

    pending = [s for s in specs if not is_complete(s, results_dir)]
    total_rounds = sum(int(resolve_config(s.config)["num-server-rounds"]) for s in pending)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    try:
        with tqdm(total=total_rounds, unit="round", desc=f"{len(pending)} runs ({len(specs) - len(pending)} done)") as bar:
            for spec in pending:
                out = spec.output_dir(results_dir)
                shutil.rmtree(out, ignore_errors=True)
                bar.set_postfix_str(spec.run_id)
                watcher = _RoundWatcher(out / METRICS_FILE, bar)
                watcher.start()
                try:
                    run_experiment({**spec.config, "output-dir": str(out)}, num_supernodes=spec.num_supernodes)
                finally:
                    watcher.stop.set()
                    watcher.join()
                    watcher.poll()
    finally:
        flwr_logger.setLevel(level)
    return pending


def rounds_to_reach(rows: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """First round whose global accuracy is at least ``target`` (None if never)."""
    for row in rows:
        if row.get("accuracy") is not None and row["accuracy"] >= target:
            return int(row["round"])
    return None


def summarize_run(spec: RunSpec, rows: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """One results.csv row."""
    evaluated = [r for r in rows if r.get("accuracy") is not None]
    trained = [r for r in rows if r["round"] > 0]
    summary: dict[str, Any] = {"run_id": spec.run_id, "variant": spec.variant, **{k: v for k, v in spec.labels.items() if k != "variant"}}
    config = resolve_config(spec.config)
    summary.update({"method": config["method"], "split-ratio": config["split-ratio"], "rounds": config["num-server-rounds"]})
    summary["final_accuracy"] = evaluated[-1]["accuracy"] if evaluated else None
    summary["best_accuracy"] = max((r["accuracy"] for r in evaluated), default=None)
    summary["final_loss"] = evaluated[-1]["loss"] if evaluated else None
    summary["rounds_to_target"] = rounds_to_reach(rows, target)
    for key in PER_ROUND_COSTS:
        values = [r[key] for r in trained if key in r]
        summary[f"{key}_per_round"] = statistics.fmean(values) if values else None
    for key in CUMULATIVE_COSTS:
        summary[key] = trained[-1].get(key) if trained else None
    summary["failed_replies"] = sum(len(r.get("failures", [])) for r in trained)
    summary["wall_s"] = rows[-1].get("elapsed_s") if rows else None
    return summary


def _group_key(summary: Mapping[str, Any], axes: Iterable[str]) -> tuple:
    return tuple((a, summary.get(a)) for a in axes)


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def _si(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def markdown_table(summaries: Sequence[Mapping[str, Any]], group_axes: Sequence[str], target: float) -> str:
    """Mean ± std over seeds per group: accuracy, rounds to target, per-participant costs."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for s in summaries:
        groups[_group_key(s, group_axes)].append(s)
    header = [*group_axes, "seeds", "final acc", "best acc", f"rounds to {target:.0%}",
              "FLOPs / participant / round", "bytes down / participant / round", "bytes up / participant / round",
              "peak memory / participant", "trained params / participant", "failed replies"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, runs in groups.items():
        finals = [r["final_accuracy"] for r in runs if r["final_accuracy"] is not None]
        bests = [r["best_accuracy"] for r in runs if r["best_accuracy"] is not None]
        reached = [r["rounds_to_target"] for r in runs if r["rounds_to_target"] is not None]
        reach = f"{statistics.fmean(reached):.1f} ({len(reached)}/{len(runs)} reached)" if reached else f"never (0/{len(runs)})"

        def cost(name: str) -> float | None:
            values = [r[name] for r in runs if r.get(name) is not None]
            return statistics.fmean(values) if values else None

        cells = [str(v) for _, v in key] + [
            str(len(runs)), _mean_std(finals), _mean_std(bests), reach,
            _si(cost("flops_max_per_round"), "FLOP"), _si(cost("bytes_down_max_per_round"), "B"),
            _si(cost("bytes_up_max_per_round"), "B"), _si(cost("peak_memory_bytes_max_per_round"), "B"),
            _si(cost("trained_params_max_per_round"), ""),
            str(sum(r["failed_replies"] for r in runs)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curves(runs: Sequence[tuple[RunSpec, list[dict]]], x_of: Any) -> tuple[list[float], list[float], list[float]]:
    """Mean x, mean and std of accuracy over seeds at every evaluated round common to all runs."""
    by_round = [{r["round"]: r for r in rows if r.get("accuracy") is not None} for _, rows in runs]
    common = sorted(set.intersection(*(set(b) for b in by_round)))
    xs, means, stds = [], [], []
    for t in common:
        accs = [b[t]["accuracy"] for b in by_round]
        xs.append(statistics.fmean(x_of(b[t]) for b in by_round))
        means.append(statistics.fmean(accs))
        stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
    return xs, means, stds


PLOTS = {
    "accuracy_vs_round": ("round", lambda r: r["round"]),
    "accuracy_vs_participant_flops": ("cumulative training FLOPs of the busiest participant", lambda r: r.get("cum_flops_per_participant_max", 0.0)),
    "accuracy_vs_participant_bytes": (
        "cumulative bytes (down + up) of the busiest participant",
        lambda r: r.get("cum_bytes_down_per_participant_max", 0.0) + r.get("cum_bytes_up_per_participant_max", 0.0),
    ),
}


def plot_curves(results_dir: Path, loaded: Sequence[tuple[RunSpec, list[dict]]], group_axes: Sequence[str]) -> list[Path]:
    """PNG plots, one curve per variant (mean over seeds, band = ± std), per group of the other axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    other_axes = [a for a in group_axes if a != "variant"]
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for spec, rows in loaded:
        groups[_group_key(spec.labels, other_axes)][spec.variant].append((spec, rows))
    paths = []
    for key, variants in groups.items():
        suffix = "".join(f"__{_slug(a)}={_slug(v)}" for a, v in key)
        for name, (xlabel, x_of) in PLOTS.items():
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for variant, runs in variants.items():
                xs, means, stds = _curves(runs, x_of)
                ax.plot(xs, means, label=variant)
                ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.15)
            if name != "accuracy_vs_round":
                ax.set_xscale("symlog")
            title = ", ".join(f"{a}={v}" for a, v in key) or "all runs"
            ax.set(xlabel=xlabel, ylabel="test accuracy of the global model", title=title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            path = results_dir / f"{name}{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def write_report(matrix: Matrix, specs: Sequence[RunSpec], results_dir: Path) -> list[Path]:
    """results.csv, results.md and the plots, from the finished runs among ``specs``."""
    loaded = [(s, read_metrics(s.output_dir(results_dir))) for s in specs if is_complete(s, results_dir)]
    summaries = [summarize_run(s, rows, matrix.target_accuracy) for s, rows in loaded]
    group_axes = ["variant"] + [a for a in matrix.axes if a not in ("variant", "seed") and len(matrix.axes[a]) > 1]
    group_axes += [k for k in matrix.points[0] if k not in group_axes]
    csv_path = results_dir / "results.csv"
    columns = list(dict.fromkeys(k for s in summaries for k in s))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(summaries)
    md_path = results_dir / "results.md"
    md_path.write_text(
        f"{len(loaded)} of {len(specs)} runs finished.\n\n" + markdown_table(summaries, group_axes, matrix.target_accuracy)
    )
    return [csv_path, md_path, *plot_curves(results_dir, loaded, group_axes)]

