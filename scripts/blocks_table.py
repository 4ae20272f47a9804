"""Issue 12's table from a harness results folder (conf/compare-blocks-seeds.toml).

Per point and variant: the final accuracy (mean ± std over seeds, and per seed), its gain over the last 12
evaluated rounds (28 -> 40: are the curves flat?), the final test loss, the coverage at the end and the FLOPs
per participant and round, as Markdown::

    python3 scripts/blocks_table.py docs/results/blocks-seeds
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

VARIANTS = ("fedavg-small", "msfusion-blocks-static-mu0-b4", "msfusion-blocks-mu0-b4", "msfusion")
POINTS = (("40", "0.0625", "1/16"), ("20", "0.125", "1/8"), ("10", "0.25", "1/4"))
LAST, EARLIER = 40, 28


def late_gain(run_dir: Path) -> float:
    """Accuracy at round LAST minus accuracy at round EARLIER."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracy = {r["round"]: r["accuracy"] for r in rows if r.get("accuracy") is not None}
    return accuracy[LAST] - accuracy[EARLIER]


def table(results: Path) -> list[str]:
    rows = list(csv.DictReader((results / "results.csv").open()))
    lines = [
        f"| participants, r | variant | seeds | final accuracy | per seed | gain rounds {EARLIER}→{LAST} | final test loss | coverage at end | FLOPs / participant / round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, ratio, label in POINTS:
        for variant in VARIANTS:
            runs = [r for r in rows if r["variant"] == variant and r["num-supernodes"] == n and r["split-ratio"] == ratio]
            if not runs:
                continue
            runs.sort(key=lambda r: int(r["seed"]))
            acc = [float(r["final_accuracy"]) for r in runs]
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            gain = statistics.mean(late_gain(results / "runs" / r["run_id"]) for r in runs)
            loss = statistics.mean(float(r["final_loss"]) for r in runs)
            coverage = statistics.mean(float(r["final_coverage"]) for r in runs)
            flops = statistics.mean(float(r["flops_max_per_round"]) for r in runs)
            lines.append(
                f"| {n}, {label} | `{variant}` | {len(runs)} | {statistics.mean(acc):.3f} ± {std:.3f} | "
                f"{' / '.join(f'{a:.3f}' for a in acc)} | {gain * 100:+.1f} pts | {loss:.3f} | {coverage:.3f} | {flops / 1e9:.2f} GFLOP |"
            )
    return lines


if __name__ == "__main__":
    print("\n".join(table(Path(sys.argv[1]))))
