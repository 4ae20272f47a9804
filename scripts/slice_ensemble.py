"""Evaluate a finished run's global model as the full model and as the ensemble of its width-r slices.

The fused model is never the function any participant trained; the slices are. For each run folder
(``global_model.pt`` and ``config.json``, as every run writes them) this slices the global model at the
next round's plans of its own policy (the windows its participants would receive), evaluates every
slice as the participant's narrow model (calibration included), and prints the accuracy of the full
model, of the slices alone (mean and best) and of their ensemble (logits averaged, probabilities averaged).

    .venv/bin/python scripts/slice_ensemble.py docs/results/blocks/runs/msfusion__num-supernodes=10__split-ratio=0.25
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from msfusion_flwr.config import DEFAULTS, RunConfig
from msfusion_flwr.data import load_test_set, model_kwargs
from msfusion_flwr.engine import PlanRequest, SplitSpec, plan_widths, slice_state
from msfusion_flwr.models import build_model
from msfusion_flwr.server.methods import POLICIES, global_widths

BATCH = 1000


def logits(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits on ``x``, in evaluation mode, in batches (BatchNorm uses batch statistics)."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])


def evaluate_run(run_dir: Path) -> dict[str, float]:
    """Accuracies of the full global model, its slices and their ensembles on the run's test set."""
    config = json.loads((run_dir / "config.json").read_text())
    run = RunConfig.from_mapping({k: v for k, v in config.items() if k in DEFAULTS})
    if run.method.name not in POLICIES or run.method.name == "fedavg-small":
        raise SystemExit(f"{run_dir}: method {run.method.name!r} trains no slices of a wider model")
    state = torch.load(run_dir / "global_model.pt", weights_only=True)
    kwargs = model_kwargs(run.data)
    full = build_model(run.model.name, global_widths(run), **kwargs)
    full.load_state_dict(state)
    spec = SplitSpec.from_model(full)
    x, y = load_test_set(run.data).tensors
    policy = POLICIES[run.method.name](run.method)
    participants = run.federation.min_available_nodes
    members = []
    for rank in range(participants):
        request = PlanRequest(spec.widths, run.method.split_ratio, rank, participants, run.federation.num_server_rounds + 1)
        assignment = policy.assign(request)
        narrow = build_model(run.model.name, plan_widths(assignment.plan), assignment.rate, **kwargs)
        narrow.load_state_dict(slice_state(state, spec, assignment.plan, run.model.calibrated))
        members.append(logits(narrow, x))

    def accuracy(z: Tensor) -> float:
        return float((z.argmax(1) == y).float().mean())

    singles = [accuracy(z) for z in members]
    return {
        "full model": accuracy(logits(full, x)),
        "slices, mean": sum(singles) / len(singles),
        "slices, best": max(singles),
        "ensemble, logits averaged": accuracy(torch.stack(members).mean(0)),
        "ensemble, probabilities averaged": accuracy(torch.stack([z.softmax(1) for z in members]).mean(0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (global_model.pt, config.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run_dir in args.runs:
        figures = evaluate_run(run_dir)
        print(run_dir.name + ": " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
