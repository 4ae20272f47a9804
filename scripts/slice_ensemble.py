"""Evaluate a finished run's global model as the full model and as the ensemble of its width-r slices.

The fused model is never the function any participant trained; the slices are. For each run folder
(``global_model.pt`` and ``config.json``, as every run writes them) this slices the global model at the
next round's plans of its own policy (the windows its participants would receive), evaluates every
slice as the participant's narrow model (calibration included), and prints the accuracy of the full
model, of every slice alone, their mean and best, and of their ensemble (logits averaged, probabilities
averaged): accuracy and test loss, and perplexity for language models.

    .venv/bin/python scripts/slice_ensemble.py docs/results/blocks/runs/msfusion__num-supernodes=10__split-ratio=0.25
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from msfusion_flwr.config import DEFAULTS, RunConfig
from msfusion_flwr.data import load_test_set, model_kwargs
from msfusion_flwr.engine import PlanRequest, SplitSpec, plan_widths, slice_state
from msfusion_flwr.models import build_model
from msfusion_flwr.server.methods import POLICIES, global_widths

BATCH = 1000


class Tally:
    """Running cross-entropy sum, correct count and target count of one predictor over test batches."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.correct = 0
        self.count = 0

    def add(self, log_probs: Tensor, y: Tensor) -> None:
        """Add a batch of (..., C) log-probabilities against (...) targets."""
        self.loss += float(F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), y.reshape(-1), reduction="sum"))
        self.correct += int((log_probs.argmax(-1) == y).sum())
        self.count += y.numel()

    def figures(self, tokens: bool) -> dict[str, float]:
        loss = self.loss / self.count
        return {"accuracy": self.correct / self.count, "loss": loss} | ({"perplexity": math.exp(loss)} if tokens else {})


def member_models(
    run: RunConfig, state: dict[str, Tensor], spec: SplitSpec, kwargs: dict[str, int], distinct: bool = False
) -> list[nn.Module]:
    """The narrow models the run's participants would receive in the round after its last (one per rank;
    ``distinct``: one per different plan)."""
    policy = POLICIES[run.method.name](run.method)
    participants = run.federation.min_available_nodes
    members, plans = [], set()
    for rank in range(participants):
        request = PlanRequest(spec.widths, run.method.split_ratio, rank, participants, run.federation.num_server_rounds + 1)
        assignment = policy.assign(request)
        key = tuple((name, tuple(index.tolist())) for name, index in sorted(assignment.plan.items()))
        if distinct and key in plans:
            continue
        plans.add(key)
        narrow = build_model(run.model.name, plan_widths(assignment.plan), assignment.rate, **kwargs)
        narrow.load_state_dict(slice_state(state, spec, assignment.plan, run.model.calibrated))
        members.append(narrow.eval())
    return members


def evaluate_run(run_dir: Path, distinct: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy and loss (and perplexity for an LM) of the full global model, of every slice, their mean and best,
    and of their ensembles (logits averaged, probabilities averaged) on the run's test set, batch by batch (an
    LM's logits over the whole test text would not fit in memory). ``distinct``: each different slice once
    (under block windows, one per block instead of one per participant)."""
    config = json.loads((run_dir / "config.json").read_text())
    run = RunConfig.from_mapping({k: v for k, v in config.items() if k in DEFAULTS})
    if run.method.name not in POLICIES or run.method.name == "fedavg-small":
        raise SystemExit(f"{run_dir}: method {run.method.name!r} trains no slices of a wider model")
    state = torch.load(run_dir / "global_model.pt", weights_only=True)
    kwargs = model_kwargs(run.data)
    full = build_model(run.model.name, global_widths(run), **kwargs).eval()
    full.load_state_dict(state)
    spec = SplitSpec.from_model(full)
    members = member_models(run, state, spec, kwargs, distinct)
    test_set = load_test_set(run.data)
    full_tally, logit_tally, prob_tally = Tally(), Tally(), Tally()
    member_tallies = [Tally() for _ in members]
    tokens = False
    with torch.no_grad():
        for x, y in DataLoader(test_set, batch_size=getattr(full, "eval_batch_size", BATCH)):
            tokens = y.dim() > 1
            full_tally.add(F.log_softmax(full(x), -1), y)
            member_logits = torch.stack([model(x) for model in members])
            log_probs = F.log_softmax(member_logits, -1)
            for tally, lp in zip(member_tallies, log_probs, strict=True):
                tally.add(lp, y)
            logit_tally.add(F.log_softmax(member_logits.mean(0), -1), y)
            prob_tally.add(torch.logsumexp(log_probs, 0) - math.log(len(members)), y)
    singles = [t.figures(tokens) for t in member_tallies]
    key = "perplexity" if tokens else "accuracy"
    best = min(singles, key=lambda f: f[key]) if tokens else max(singles, key=lambda f: f[key])
    return {
        "full model": full_tally.figures(tokens),
        **{f"slice {i}": f for i, f in enumerate(singles)},
        "slices, mean": {k: sum(f[k] for f in singles) / len(singles) for k in singles[0]},
        "slices, best": best,
        "ensemble, logits averaged": logit_tally.figures(tokens),
        "ensemble, probabilities averaged": prob_tally.figures(tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (global_model.pt, config.json)")
    parser.add_argument("--distinct", action="store_true", help="each different slice once (block windows: one per block)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run_dir in args.runs:
        print(run_dir.name)
        for name, figures in evaluate_run(run_dir, args.distinct).items():
            print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
