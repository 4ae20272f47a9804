"""One large simulated federation, measured: time per round, overhead per message, the server's peak memory.

Runs ``run_experiment`` (Flower's simulation engine, in this process: the
ServerApp and Ray's driver live here, the ClientApps in Ray's actors) with
``--partitions`` SuperNodes and the run config given, then reads the run's
metrics.jsonl. Run each configuration in its own process: the peak RSS is the
process's ``ru_maxrss`` (this process only, not Ray's actors).

    .venv/bin/python scripts/scale_run.py --partitions 1000 --run-config conf/scale-1000.toml
    .venv/bin/python scripts/scale_run.py --partitions 100 --run-config conf/scale-1000.toml --set fraction-train=1.0 min-available-nodes=100
    .venv/bin/python scripts/scale_run.py --partitions 1000 --run-config conf/scale-1000-cifar.toml --cifar-fixture 50000 --state-in-work

Prints a JSON object: the settings, per round the wall time, the participants,
the sum of their local training times, the seconds the server spent in the
strategy's train methods (``server_s``: planning, slicing, checking, fusing)
and their share of the round, and where the actors' time went per train
message (``wall x actors / participants``, with ``actors`` ClientApps running
at once): ``training``; ``beyond_training``, the rest, split into
``device_rest`` (our ClientApp handler's work besides training: decoding, the
narrow model, the partition, the reply's arrays), ``server`` (``server_s`` per
message) and ``engine_and_idle`` (everything outside our handler: Flower's and
Ray's messaging and serialization, and actors idle while the server plans,
fuses or evaluates, so the server's share overlaps it); and the peak RSS in
MiB. ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
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


def write_fixture(folder: Path, n_train: int) -> None:
    """A CIFAR-10-shaped copy in the Hub's layout, written by a child process, so that this process's peak RSS
    (what the run reports) does not count the images the writer holds."""
    from msfusion_flwr.data.hub_copy import write_hub_copy

    child = multiprocessing.get_context("spawn").Process(
        target=write_hub_copy, args=(folder, "cifar10"), kwargs={"n_train": n_train, "n_test": 1000}
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the CIFAR-10 fixture failed (exit code {child.exitcode})")


def per_message(row: dict, n: int, actors: int) -> dict[str, float | None]:
    """Where a round's actor time went, per train message (seconds): local training, the rest of our ClientApp's
    handler, our server's work, and what is left of ``wall x actors`` (Flower's and Ray's messaging and
    serialization, and actors idle while the server plans, fuses or evaluates)."""
    if not n:
        return {}
    handler = row.get("handler_time_s_sum") or math.nan  # revisions before the handler was timed: unknown
    train, actor_seconds = row["train_time_s_sum"], row["wall_s"] * actors
    split = {"beyond_training": (actor_seconds - train) / n, "training": train / n, "device_rest": (handler - train) / n,
             "server": row["server_s"] / n, "engine_and_idle": (actor_seconds - handler) / n}  # fmt: skip
    return {k: None if math.isnan(v) else round(v, 4) for k, v in split.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, required=True, help="simulated SuperNodes (one partition each)")
    parser.add_argument("--run-config", type=Path, help="a TOML run config (e.g. conf/scale-1000.toml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="ClientApps running at once (one CPU each)")
    parser.add_argument("--cifar-fixture", type=int, metavar="N", help="train on a local CIFAR-10-shaped copy in the Hub's layout "
                        "with N random training images (and 1,000 test images), written to a temporary folder: data-dir")
    parser.add_argument("--state-in-work", action="store_true", help="participant-state-dir in the run's temporary "
                        "folder: participants keep their previous sub-model there, not in the simulation driver's memory")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from msfusion_flwr.apps import run_experiment

    config = tomllib.loads(args.run_config.read_text()) if args.run_config else {}
    config |= {key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)}
    with tempfile.TemporaryDirectory() as work:
        config.setdefault("output-dir", str(Path(work) / "run"))
        if args.state_in_work:
            config["participant-state-dir"] = str(Path(work) / "participant-state")
        if args.cifar_fixture:
            write_fixture(Path(work) / "cifar10", args.cifar_fixture)
            config |= {"dataset": "cifar10", "data-dir": str(Path(work) / "cifar10")}
        out = run_experiment(config, num_supernodes=args.partitions)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = []
    for row in rows[1:]:
        n = len(row["participants"])
        rounds.append({"round": row["round"], "wall_s": round(row["wall_s"], 2), "participants": n,
                       "train_time_s_sum": round(row["train_time_s_sum"], 2), "server_s": round(row["server_s"], 2),
                       "server_share": round(row["server_s"] / row["wall_s"], 4), "failures": len(row["failures"]),
                       "accuracy": row["accuracy"], "seconds_per_message": per_message(row, n, args.actors)})  # fmt: skip
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
