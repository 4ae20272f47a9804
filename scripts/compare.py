"""Run a comparison matrix (resumable) and write results.csv, results.md and plots.

    .venv/bin/python scripts/compare.py conf/compare-fashion-mnist.toml --results-dir docs/results/fashion-mnist
    .venv/bin/python scripts/compare.py conf/compare-fashion-mnist.toml --results-dir ... --only seed=0
    .venv/bin/python scripts/compare.py conf/compare-fashion-mnist.toml --results-dir ... --report-only
    .venv/bin/python scripts/compare.py conf/compare-fashion-mnist.toml --results-dir ... --engine in-process --torch-device cuda

Runs that already finished with the same config are skipped; the report covers
the finished runs. See msfusion_flwr/experiments/comparison.py for the matrix format.

The report is about one metric of the global model, chosen by the matrix's
top-level ``metric``: "accuracy" (default, higher is better), "perplexity"
(language models) or "loss" (both lower is better); ``target = <number>`` is
the value to reach for "rounds to reach" (>= for accuracy, <= otherwise;
default 0.8 for accuracy, none otherwise). ``target-accuracy`` still works as
accuracy's target (not with ``target``, nor with another metric). results.csv
gets final_<metric>, best_<metric> and rounds_to_target, results.md the
columns "final <metric>", "best <metric>" and "rounds to <metric> <=/>= target",
and the plots are <metric>_vs_round.png, <metric>_vs_participant_flops.png and
<metric>_vs_participant_bytes.png (perplexity on a log scale).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from msfusion_flwr.config import ConfigError
from msfusion_flwr.models.placement import is_device_name
from msfusion_flwr.experiments.comparison import ENGINES, MatrixError, RunsFailed, expand, load_matrix, run_matrix, select, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix", help="matrix file (TOML)")
    parser.add_argument("--results-dir", required=True, type=Path)
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs; run nothing")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE", help="run only the runs with this label (repeatable); the report still covers every finished run")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's INFO log")
    parser.add_argument("--engine", choices=ENGINES, default="simulation", help="Flower's simulation engine (Ray, default) or one process without Ray")
    parser.add_argument("--torch-device", metavar="DEVICE", help="where every run trains and evaluates ('auto', 'cuda', ...): the same computation, rounded differently, so not bit-identical to a CPU run")
    args = parser.parse_args()
    if args.torch_device is not None and not is_device_name(args.torch_device):
        sys.exit(f"error: --torch-device {args.torch_device!r} is not 'auto' or a PyTorch device such as 'cuda'")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        matrix = load_matrix(args.matrix)
        specs = expand(matrix)
        chosen = select(specs, args.only)
    except (MatrixError, ConfigError) as error:
        sys.exit(f"error: {error}")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    if not args.report_only:
        try:
            run_matrix(chosen, args.results_dir, verbose=args.verbose, engine=args.engine, torch_device=args.torch_device)
        except RunsFailed as error:
            failed = error.failures
    for path in write_report(matrix, specs, args.results_dir):
        print(path)
    if failed:
        sys.exit(f"error: {len(failed)} run(s) failed (the report covers the others): " + "; ".join(f"{k}: {v}" for k, v in failed.items()))


if __name__ == "__main__":
    main()
