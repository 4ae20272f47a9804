"""Every method for 3 rounds on one model (e.g. a torchvision model whose width groups are derived).

    .venv/bin/python scripts/check_derived_methods.py torchvision:resnet18 fedavg fedavg-small heterofl fedrolex fd fjord feddf msfusion

Fashion-MNIST, 3 participants with budgets 0.25/0.5/0.25, IID partitions of 5 % of the training set
(FedDF: 5 % more held out as its server slice), seed 0, Flower's simulation engine in-process. The server
evaluates on the first 1,000 test images (the full test set would dominate the time). Prints one line per
method: (round, accuracy, loss) and the failed replies. It shows that each method runs and learns on the
model; it is not a comparison (3 rounds, one seed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.utils.data import TensorDataset

from msfusion_flwr.apps import run_experiment
from msfusion_flwr.server import run as server_run
from msfusion_flwr.server.reporting import read_metrics

EVAL_EXAMPLES = 1000


def check(model: str, method: str, out_root: Path) -> str:
    """One 3-round run of ``method`` on ``model``; its summary line."""
    started = time.perf_counter()
    config = {
        "method": method, "model": model, "num-server-rounds": 3, "data-fraction": 0.05, "partitioner": "iid",
        "budgets": "0.25,0.5", "min-available-nodes": 3, "output-dir": str(out_root / method),
        **({"server-data-fraction": 0.05} if method == "feddf" else {}),
    }  # fmt: skip
    rows = read_metrics(run_experiment(config, num_supernodes=3))
    curve = [(r["round"], round(r["accuracy"], 3), round(r["loss"], 3)) for r in rows]
    return f"{method}: {curve} failures {rows[-1]['failures']} ({time.perf_counter() - started:.0f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("methods", nargs="+")
    args = parser.parse_args()
    full_test_set = server_run.load_test_set
    server_run.load_test_set = lambda data: TensorDataset(*full_test_set(data)[:EVAL_EXAMPLES])
    out_root = Path(tempfile.mkdtemp(prefix="check-derived-"))
    for method in args.methods:
        print(check(args.model, method, out_root), flush=True)


if __name__ == "__main__":
    main()
