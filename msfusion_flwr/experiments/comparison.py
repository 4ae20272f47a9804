"""Comparison harness: a matrix of runs, resumable, summarised as CSV, Markdown and plots.

A matrix file (TOML) holds

* ``[base]``: run-config values shared by every run;
* ``[variants]``: label -> run-config overrides (ablations); a label that is a
  method name needs no entry;
* ``[matrix]``: lists to take the product of: ``variant``, ``seed``,
  ``num-supernodes`` and any run-config key;
* ``[[points]]`` (optional): sets of values that go together (e.g. more
  participants with a smaller split ratio), multiplied with ``[matrix]``;
* ``metric`` (optional, top level): the global-model metric the report is
  about, ``"accuracy"`` (the default; higher is better), ``"perplexity"``
  (language models; lower is better) or ``"loss"`` (lower is better). The
  summaries (``final_<metric>``, ``best_<metric>``: the maximum or minimum by
  direction), the Markdown table's columns and the plots (``<metric>_vs_*.png``,
  the y-axis labelled with the metric, logarithmic for perplexity) follow it;
* ``target`` (optional, top level): the value of ``metric`` to reach for
  "rounds to reach" (the first evaluated round with accuracy >= target, or
  perplexity / loss <= target). Default 0.8 for accuracy; for perplexity and
  loss without a target there is no "rounds to" column;
* ``target-accuracy`` (optional, top level): the older spelling of ``target``,
  for ``metric = "accuracy"`` only (not together with ``target``).

Every run goes through :func:`msfusion_flwr.apps.run_experiment` (in-process
simulation) into ``<results>/runs/<run id>/``; a run whose metrics already
reach its last round with the same config is skipped, so an interrupted
comparison resumes where it stopped. A run left unfinished starts again from
scratch, unless the matrix sets ``checkpoint-every``: then it continues from
its last checkpoint, with its participants' state kept in its own folder
(``participant-state-dir``, unless the matrix sets one), so the resumed run
ends as an uninterrupted one would. A checkpointed run also continues when the
matrix raises ``num-server-rounds``, and from a run folder copied in from
another results folder: a longer comparison reuses the shorter one's rounds.
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

from ..config import IGNORED_ON_RESUME, METHODS, ConfigError, RunConfig, comparable, with_defaults
from ..device.faults import is_attacker
from ..server.checkpoint import resume_state
from ..server.reporting import CONFIG_FILE, METRICS_FILE, read_metrics

RUNS_DIR = "runs"
PARTICIPANT_STATE_DIR = "participant-state"
EXECUTION_KEYS = IGNORED_ON_RESUME
"""Config keys that say where and how a run executes, not what it computes: a
finished run counts as complete whatever they hold (its folder may have moved)."""
NON_CONFIG_AXES = ("variant", "num-supernodes")
PER_ROUND_COSTS = ("flops_max", "bytes_down_max", "bytes_up_max", "peak_memory_bytes_max", "trained_params_max", "train_time_s_max")
CUMULATIVE_COSTS = ("cum_flops_per_participant_max", "cum_bytes_down_per_participant_max", "cum_bytes_up_per_participant_max")


METRICS = {"accuracy": True, "perplexity": False, "loss": False}
"""Metrics a matrix can be about -> whether higher is better."""
DEFAULT_TARGETS = {"accuracy": 0.8}
"""The target when a matrix names none (other metrics: no "rounds to")."""


class MatrixError(ValueError):
    """An invalid matrix file; the message is one line."""


@dataclass(frozen=True)
class Matrix:
    """A parsed matrix file."""

    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    axes: dict[str, list[Any]]
    points: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    metric: str = "accuracy"
    target: float | None = 0.8


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

    @property
    def run(self) -> RunConfig:
        """The run's config, resolved (before the harness says where it writes)."""
        return RunConfig.from_mapping(self.config)


def load_matrix(path: str | Path) -> Matrix:
    """Parse and check a matrix file."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise MatrixError(f"cannot read matrix {path}: {error}") from None
    unknown = set(raw) - {"base", "variants", "matrix", "points", "metric", "target", "target-accuracy"}
    if unknown:
        raise MatrixError(f"matrix {path}: unknown section(s) {sorted(unknown)}")
    metric, target = _metric_and_target(raw, path)
    axes = {k: v if isinstance(v, list) else [v] for k, v in raw.get("matrix", {}).items()}
    axes.setdefault("variant", ["msfusion"])
    axes.setdefault("num-supernodes", [10])
    matrix = Matrix(
        base=dict(raw.get("base", {})),
        variants={k: dict(v) for k, v in raw.get("variants", {}).items()},
        axes=axes,
        points=[dict(p) for p in raw.get("points", [{}])] or [{}],
        metric=metric,
        target=target,
    )
    for variant in axes["variant"]:
        if variant not in matrix.variants and variant not in METHODS:
            raise MatrixError(f"matrix {path}: variant {variant!r} is neither a method nor in [variants]")
    return matrix


def _metric_and_target(raw: Mapping[str, Any], path: str | Path) -> tuple[str, float | None]:
    """The matrix's ``metric`` and ``target`` (``target-accuracy`` being accuracy's target)."""
    metric = raw.get("metric", "accuracy")
    if not isinstance(metric, str) or metric not in METRICS:
        raise MatrixError(f"matrix {path}: metric {metric!r} is not one of {', '.join(METRICS)}")
    if "target" in raw and "target-accuracy" in raw:
        raise MatrixError(f"matrix {path}: give either target or target-accuracy, not both")
    if "target-accuracy" in raw and metric != "accuracy":
        raise MatrixError(f"matrix {path}: target-accuracy is for metric accuracy; with metric {metric!r} use target")
    key = "target-accuracy" if "target-accuracy" in raw else "target"
    if key not in raw:
        return metric, DEFAULT_TARGETS.get(metric)
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise MatrixError(f"matrix {path}: {key} must be a number, not {value!r}")
    return metric, float(value)


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
            RunConfig.from_mapping(config)  # fail before any run starts
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


def run_config(spec: RunSpec, results_dir: Path, resume: bool = False) -> RunConfig:
    """The config ``spec`` runs with: its own, writing into its folder.

    A checkpointing run also keeps its participants' state in that folder, so
    a resume continues exactly and runs never share state files.
    """
    out = spec.output_dir(results_dir).resolve()
    run = spec.run.with_outputs(output_dir=str(out), resume=resume)
    if run.outputs.checkpoint_every > 0 and not run.outputs.participant_state_dir:
        run = run.with_outputs(participant_state_dir=str(out / PARTICIPANT_STATE_DIR))
    return run


def is_complete(spec: RunSpec, results_dir: Path) -> bool:
    """Whether the run already finished with this exact config.

    A key the stored config lacks (one added to the app after the run) counts
    as its default, so a new key left at its default keeps finished runs.
    """
    out = spec.output_dir(results_dir)
    try:
        stored = json.loads((out / CONFIG_FILE).read_text())
        rows = read_metrics(out)
    except (OSError, json.JSONDecodeError):
        return False
    expected = run_config(spec, results_dir)
    same = comparable(with_defaults(stored), EXECUTION_KEYS) == comparable(expected.to_dict(), EXECUTION_KEYS)
    return same and bool(rows) and rows[-1]["round"] == expected.federation.num_server_rounds


def can_resume(spec: RunSpec, results_dir: Path) -> bool:
    """Whether the run's folder holds a checkpoint of this very run to continue from."""
    try:
        return resume_state(run_config(spec, results_dir, resume=True)) is not None
    except ConfigError:  # a checkpoint of another config: start again
        return False


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


class RunsFailed(RuntimeError):
    """Some runs of a matrix failed (the others ran); ``failures`` maps run id -> one-line reason."""

    def __init__(self, failures: Mapping[str, str], ran: Sequence[RunSpec]) -> None:
        super().__init__(f"{len(failures)} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
        self.failures = dict(failures)
        self.ran = list(ran)


ENGINES = ("simulation", "in-process")
"""How a matrix's runs execute: Flower's simulation engine (Ray), or the same ServerApp and ClientApp in one
process (:func:`~msfusion_flwr.experiments.loopback.run_in_process`: no Ray, participants one after another)."""


def run_matrix(
    specs: Sequence[RunSpec],
    results_dir: Path,
    verbose: bool = False,
    engine: str = "simulation",
    torch_device: str | None = None,
) -> list[RunSpec]:
    """Run every spec not complete yet; returns the ones that ran.

    A run that fails (an invalid combination, too few nodes, impossible
    partitions, every participant failing) does not stop the others: its
    reason is printed in one line, and :class:`RunsFailed` is raised once
    every other run has run. Each run is bounded by its own deadlines
    (``node-wait-timeout``, ``round-timeout`` per round, ``max-failed-rounds``).
    ``engine`` is one of :data:`ENGINES`; ``torch_device`` sets every run's
    ``torch-device`` (a key that says where a run executes, not what it computes).
    """
    from tqdm.auto import tqdm

    from ..apps import run_experiment
    from .loopback import run_in_process

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    execute = run_experiment if engine == "simulation" else run_in_process
    device = {} if torch_device is None else {"torch-device": torch_device}

    pending = [s for s in specs if not is_complete(s, results_dir)]
    total_rounds = sum(s.run.federation.num_server_rounds for s in pending)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    failures: dict[str, str] = {}
    try:
        with tqdm(total=total_rounds, unit="round", desc=f"{len(pending)} runs ({len(specs) - len(pending)} done)") as bar:
            for spec in pending:
                out = spec.output_dir(results_dir)
                resume = can_resume(spec, results_dir)
                if not resume:
                    shutil.rmtree(out, ignore_errors=True)
                bar.set_postfix_str(spec.run_id + (" (resumed)" if resume else ""))
                watcher = _RoundWatcher(out / METRICS_FILE, bar)
                watcher.start()
                try:
                    config = {**run_config(spec, results_dir, resume).to_dict(), **device}
                    execute(config, num_supernodes=spec.num_supernodes)
                except Exception as error:  # one failed run must not cost the others
                    failures[spec.run_id] = f"{type(error).__name__}: {' '.join(str(error).split())}"
                    tqdm.write(f"run {spec.run_id} failed: {failures[spec.run_id]}")
                finally:
                    watcher.stop.set()
                    watcher.join()
                    watcher.poll()
    finally:
        flwr_logger.setLevel(level)
    if failures:
        raise RunsFailed(failures, pending)
    return pending


def _check_metric(metric: str) -> bool:
    """Whether higher is better for ``metric``; ValueError for an unknown one."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    return METRICS[metric]


def rounds_to_reach(rows: Sequence[Mapping[str, Any]], target: float, metric: str = "accuracy") -> int | None:
    """First round whose global ``metric`` reaches ``target`` (None if never).

    Reaching is ``>= target`` for accuracy and ``<= target`` for perplexity and
    loss; rounds without the metric (not evaluated) do not count.
    """
    higher_is_better = _check_metric(metric)
    for row in rows:
        value = row.get(metric)
        if value is not None and (value >= target if higher_is_better else value <= target):
            return int(row["round"])
    return None


FLATNESS_ROUNDS = 10
"""Issue 12's flatness window: a curve is flat when it gained under 0.5 points of accuracy (2 % of perplexity) over it."""
CHANGE_KEY = f"change_last_{FLATNESS_ROUNDS}_rounds"
"""The results.csv column (summary key) of :func:`change_over_last_rounds`."""


def change_over_last_rounds(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy", rounds: int = FLATNESS_ROUNDS) -> float | None:
    """How much ``metric`` moved from the last evaluation at least ``rounds`` rounds before the final one to the final one.

    Accuracy in points (100 × the difference: positive is a gain); perplexity and loss
    in percent of the earlier value (negative is a gain). None when the run has no
    evaluation that early. With evaluations every k rounds the window can be longer than
    ``rounds`` (12 rounds when k = 4 and the run ends at round 60).
    """
    higher_is_better = _check_metric(metric)
    evaluated = [r for r in rows if r.get(metric) is not None]
    if not evaluated:
        return None
    final = evaluated[-1]
    earlier = [r for r in evaluated if r["round"] <= final["round"] - rounds]
    if not earlier:
        return None
    then, now = earlier[-1][metric], final[metric]
    if higher_is_better:
        return 100.0 * (now - then)
    return 100.0 * (now - then) / then if then else None


def summarize_run(spec: RunSpec, rows: Sequence[Mapping[str, Any]], target: float | None, metric: str = "accuracy") -> dict[str, Any]:
    """One results.csv row.

    ``final_<metric>`` and ``best_<metric>`` (max or min by the metric's
    direction), then the final values of the other metrics (perplexity only
    for runs that report one; loss always), ``rounds_to_target`` (None if
    never reached or no target), costs, failed replies and wall time.
    """
    higher_is_better = _check_metric(metric)
    evaluated = [r for r in rows if r.get(metric) is not None]
    trained = [r for r in rows if r["round"] > 0]
    summary: dict[str, Any] = {"run_id": spec.run_id, "variant": spec.variant, **{k: v for k, v in spec.labels.items() if k != "variant"}}
    run = spec.run
    summary.update({"method": run.method.name, "split-ratio": run.method.split_ratio, "rounds": run.federation.num_server_rounds})
    summary[f"final_{metric}"] = evaluated[-1][metric] if evaluated else None
    best = max if higher_is_better else min
    summary[f"best_{metric}"] = best((r[metric] for r in evaluated), default=None)
    summary[CHANGE_KEY] = change_over_last_rounds(rows, metric)
    for other in METRICS:
        if other == metric or (other == "perplexity" and not any(r.get("perplexity") is not None for r in rows)):
            continue
        with_other = [r for r in rows if r.get(other) is not None]
        summary[f"final_{other}"] = with_other[-1][other] if with_other else None
    summary["rounds_to_target"] = rounds_to_reach(rows, target, metric) if target is not None else None
    for key in PER_ROUND_COSTS:
        values = [r[key] for r in trained if key in r]
        summary[f"{key}_per_round"] = statistics.fmean(values) if values else None
    for key in CUMULATIVE_COSTS:
        summary[key] = trained[-1].get(key) if trained else None
    summary["final_coverage"] = trained[-1].get("coverage") if trained else None
    summary["final_coverage_split"] = trained[-1].get("coverage_split") if trained else None
    summary["final_dp_epsilon"] = trained[-1].get("dp_epsilon") if trained else None
    summary["failed_replies"] = sum(len(r.get("failures", [])) for r in trained)
    screened = [p for r in trained for p in r.get("screened_out") or []]
    attackers = {p for p in range(spec.num_supernodes) if is_attacker(run.faults, run.seed, p, spec.num_supernodes)}
    summary["screened_attackers"] = sum(p in attackers for p in screened)
    summary["screened_honest"] = sum(p not in attackers for p in screened)
    summary["wall_s"] = rows[-1].get("elapsed_s") if rows else None
    return summary


def _group_key(summary: Mapping[str, Any], axes: Iterable[str]) -> tuple:
    return tuple((a, summary.get(a)) for a in axes)


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation; 0 for one value, nan if any value is not finite."""
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) if all(math.isfinite(v) for v in values) else math.nan


def _mean_std(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "—"
    return f"{statistics.fmean(values):.{digits}f} ± {_std(values):.{digits}f}"


METRIC_COLUMNS = {"accuracy": "acc", "perplexity": "perplexity", "loss": "loss"}
"""A metric's name in the Markdown table's header."""
METRIC_DIGITS = {"accuracy": 4, "perplexity": 2, "loss": 4}
"""Decimals of a metric in the Markdown table."""


def _reach_header(metric: str, target: float) -> str:
    if metric == "accuracy":
        return f"rounds to {target:.0%}"
    return f"rounds to {metric} {'>=' if METRICS[metric] else '<='} {target:g}"


def _si(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def markdown_table(
    summaries: Sequence[Mapping[str, Any]], group_axes: Sequence[str], target: float | None, metric: str = "accuracy"
) -> str:
    """Mean ± std over seeds per group: the metric (final, best, and final per seed in seed order), its change over
    the last :data:`FLATNESS_ROUNDS` rounds per seed (:func:`change_over_last_rounds`), rounds to target,
    the model's coverage at the end (mean over seeds), per-participant costs; for a matrix with private runs
    (``dp-noise-multiplier`` > 0), also the epsilon spent at the end ("∞" for its runs without noise); where
    screening left replies out, how many came from the simulated attackers and how many from honest participants.

    Columns "final <metric>", "best <metric>" and "rounds to <metric> >= / <= target"
    (for accuracy, as before: "final acc", "best acc", "rounds to 80%"); no
    "rounds to" column when ``target`` is None.
    """
    _check_metric(metric)
    name, digits = METRIC_COLUMNS[metric], METRIC_DIGITS[metric]
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for s in summaries:
        groups[_group_key(s, group_axes)].append(s)
    reach_header = [] if target is None else [_reach_header(metric, target)]
    private = any(s.get("final_dp_epsilon") is not None for s in summaries)
    screening = any(s.get("screened_attackers") or s.get("screened_honest") for s in summaries)
    change_unit = "points" if METRICS[metric] else "%"
    header = [*group_axes, "seeds", f"final {name}", f"best {name}", f"final {name} per seed",
              f"change over last {FLATNESS_ROUNDS} rounds per seed ({change_unit})", *reach_header,
              *(["epsilon at end"] if private else []), "coverage at end", "FLOPs / participant / round", "bytes down / participant / round",
              "bytes up / participant / round", "peak memory / participant", "trained params / participant", "failed replies",
              *(["screened out: attackers / honest (replies)"] if screening else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, runs in groups.items():
        finals = [r[f"final_{metric}"] for r in runs if r.get(f"final_{metric}") is not None]
        bests = [r[f"best_{metric}"] for r in runs if r.get(f"best_{metric}") is not None]
        reached = [r["rounds_to_target"] for r in runs if r.get("rounds_to_target") is not None]
        reach = f"{statistics.fmean(reached):.1f} ({len(reached)}/{len(runs)} reached)" if reached else f"never (0/{len(runs)})"

        def cost(name: str) -> float | None:
            values = [r[name] for r in runs if r.get(name) is not None]
            return statistics.fmean(values) if values else None

        by_seed = sorted(runs, key=lambda r: (r.get("seed") is None, r.get("seed")))
        per_seed = " / ".join(
            "—" if r.get(f"final_{metric}") is None else f"{r[f'final_{metric}']:.{digits}f}" for r in by_seed
        )
        per_seed_change = " / ".join("—" if r.get(CHANGE_KEY) is None else f"{r[CHANGE_KEY]:+.2f}" for r in by_seed)
        covered, spent = cost("final_coverage"), cost("final_dp_epsilon")
        privacy = ["∞" if spent is None else f"{spent:.3g}"] if private else []
        cells = [str(v) for _, v in key] + [
            str(len(runs)), _mean_std(finals, digits), _mean_std(bests, digits), per_seed, per_seed_change,
            *([reach] if reach_header else []),
            *privacy,
            "—" if covered is None else f"{covered:.3f}", _si(cost("flops_max_per_round"), "FLOP"), _si(cost("bytes_down_max_per_round"), "B"),
            _si(cost("bytes_up_max_per_round"), "B"), _si(cost("peak_memory_bytes_max_per_round"), "B"),
            _si(cost("trained_params_max_per_round"), ""),
            str(sum(r["failed_replies"] for r in runs)),
            *([f"{sum(r.get('screened_attackers', 0) for r in runs)} / {sum(r.get('screened_honest', 0) for r in runs)}"] if screening else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curves(
    runs: Sequence[tuple[RunSpec, list[dict]]], x_of: Any, metric: str = "accuracy"
) -> tuple[list[float], list[float], list[float]]:
    """Mean x, mean and std of ``metric`` over seeds at every evaluated round common to all runs."""
    by_round = [{r["round"]: r for r in rows if r.get(metric) is not None} for _, rows in runs]
    common = sorted(set.intersection(*(set(b) for b in by_round)))
    xs, means, stds = [], [], []
    for t in common:
        values = [b[t][metric] for b in by_round]
        xs.append(statistics.fmean(x_of(b[t]) for b in by_round))
        means.append(statistics.fmean(values))
        stds.append(_std(values))
    return xs, means, stds


PLOTS = {
    "vs_round": ("round", lambda r: r["round"]),
    "vs_participant_flops": ("cumulative training FLOPs of the busiest participant", lambda r: r.get("cum_flops_per_participant_max", 0.0)),
    "vs_participant_bytes": (
        "cumulative bytes (down + up) of the busiest participant",
        lambda r: r.get("cum_bytes_down_per_participant_max", 0.0) + r.get("cum_bytes_up_per_participant_max", 0.0),
    ),
}
"""Plot name (after ``<metric>_``) -> x-axis label and x of a row."""


COVERAGE_LABEL = "coverage: fraction of the model's elements trained so far"

LINE_STYLES = ("-", "--", ":", "-.")


def curve_styles(variants: Sequence[str]) -> dict[str, dict[str, str]]:
    """A distinct (colour, line style) per variant: tab10's ten colours, then the same colours dashed, dotted, ..."""
    return {
        v: {"color": f"C{i % 10}", "linestyle": LINE_STYLES[(i // 10) % len(LINE_STYLES)]} for i, v in enumerate(variants)
    }


def plot_curves(
    results_dir: Path,
    loaded: Sequence[tuple[RunSpec, list[dict]]],
    group_axes: Sequence[str],
    metric: str = "accuracy",
    plots: Mapping[str, tuple[str, Any]] = PLOTS,
    ylabel: str | None = None,
) -> list[Path]:
    """PNG plots of a row quantity (``metric``), one curve per variant (mean over seeds, band = ± std), per group of the other axes.

    Files ``<metric>_<plot>`` for each of ``plots`` (by default ``vs_round``,
    ``vs_participant_flops`` and ``vs_participant_bytes``), plus
    ``__<axis>=<value>`` per group; perplexity on a logarithmic y-axis.
    Runs whose rows lack ``metric`` (stored before it existed) are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    other_axes = [a for a in group_axes if a != "variant"]
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for spec, rows in loaded:
        groups[_group_key(spec.labels, other_axes)][spec.variant].append((spec, rows))
    styles = curve_styles(list(dict.fromkeys(spec.variant for spec, _ in loaded)))
    paths = []
    for key, variants in groups.items():
        suffix = "".join(f"__{_slug(a)}={_slug(v)}" for a, v in key)
        for name, (xlabel, x_of) in plots.items():
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for variant, runs in variants.items():
                if not all(any(r.get(metric) is not None for r in rows) for _, rows in runs):
                    continue
                xs, means, stds = _curves(runs, x_of, metric)
                if name != "vs_round":  # a log cost axis; round 0 (no cost yet) has no place on it
                    kept = [i for i, x in enumerate(xs) if x > 0]
                    xs, means, stds = ([seq[i] for i in kept] for seq in (xs, means, stds))
                ax.plot(xs, means, label=variant, **styles[variant])
                ax.fill_between(
                    xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                    alpha=0.15, color=styles[variant]["color"],
                )
            if name != "vs_round":
                ax.set_xscale("log")
            if metric == "perplexity":
                ax.set_yscale("log")
            title = ", ".join(f"{a}={v}" for a, v in key) or "all runs"
            ax.set(xlabel=xlabel, ylabel=ylabel or f"test {metric} of the global model", title=title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            path = results_dir / f"{metric}_{name}{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def write_report(matrix: Matrix, specs: Sequence[RunSpec], results_dir: Path) -> list[Path]:
    """results.csv, results.md and the plots, from the finished runs among ``specs``."""
    loaded = [(s, read_metrics(s.output_dir(results_dir))) for s in specs if is_complete(s, results_dir)]
    summaries = [summarize_run(s, rows, matrix.target, matrix.metric) for s, rows in loaded]
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
        f"{len(loaded)} of {len(specs)} runs finished.\n\n" + markdown_table(summaries, group_axes, matrix.target, matrix.metric)
    )
    coverage = plot_curves(results_dir, loaded, group_axes, "coverage", {"vs_round": PLOTS["vs_round"]}, COVERAGE_LABEL)
    return [csv_path, md_path, *plot_curves(results_dir, loaded, group_axes, matrix.metric), *coverage]

