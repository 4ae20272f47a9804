"""One large simulated federation, measured: time per round, overhead per message, the server's peak memory.

Runs ``run_experiment`` (Flower's simulation engine, in this process: the
ServerApp and Ray's driver live here, the ClientApps in Ray's actors) with
``--partitions`` SuperNodes and the run config given, then reads the run's
metrics.jsonl. Run each configuration in its own process: the peak RSS is the
process's ``ru_maxrss`` (this process only, not Ray's actors).

    .venv/bin/python scripts/scale_run.py --partitions 1000 --run-config conf/scale-1000.toml
    .venv/bin/python scripts/scale_run.py --partitions 100 --run-config conf/scale-1000.toml --set fraction-train=1.0 min-available-nodes=100

Prints a JSON object: the settings, per round the wall time, the participants,
the sum of their local training times and the overhead per train message
(``(wall x actors - sum of training) / participants``: what a message costs
beyond training, server work included, with ``actors`` ClientApps running at
once), and the peak RSS in MiB. ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import tomllib
from pathlib import Path


def parse_value(text: str) -> object:
    """A ``--set`` value as TOML reads it (numbers, booleans, quoted strings), else the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, required=True, help="simulated SuperNodes (one partition each)")
    parser.add_argument("--run-config", type=Path, help="a TOML run config (e.g. conf/scale-1000.toml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="ClientApps running at once (one CPU each)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from msfusion_flwr.apps import run_experiment

    config = tomllib.loads(args.run_config.read_text()) if args.run_config else {}
    config |= {key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)}
    with tempfile.TemporaryDirectory() as work:
        config.setdefault("output-dir", str(Path(work) / "run"))
        out = run_experiment(config, num_supernodes=args.partitions)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = []
    for row in rows[1:]:
        n = len(row["participants"])
        overhead = (row["wall_s"] * args.actors - row["train_time_s_sum"]) / n if n else None
        rounds.append(
            {"round": row["round"], "wall_s": round(row["wall_s"], 2), "participants": n,
             "train_time_s_sum": round(row["train_time_s_sum"], 2), "overhead_s_per_message": overhead and round(overhead, 3),
             "failures": len(row["failures"]), "accuracy": row["accuracy"]}
        )  # fmt: skip
    report = {
        "partitions": args.partitions,
        "actors": args.actors,
        "config": {k: v for k, v in config.items() if k != "output-dir"},
        "rounds": rounds,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
