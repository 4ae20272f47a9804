"""Every partial-training method runs end to end through Flower's simulation engine."""

from __future__ import annotations

import pytest
import torch

from msfusion_flwr.apps import run_experiment
from msfusion_flwr.models import build_model
from msfusion_flwr.server.methods import POLICIES
from msfusion_flwr.server.reporting import MODEL_FILE, read_metrics


@pytest.mark.parametrize("method", sorted(set(POLICIES) - {"msfusion"}))
def test_method_trains_through_the_simulation_engine(method, tmp_path):
    """2 rounds, 3 participants with budgets 0.25/0.5/0.25: learns, every reply aggregated."""
    out = run_experiment(
        {
            "method": method,
            "num-server-rounds": 2,
            "data-fraction": 0.05, "test-examples": 1000,
            "partitioner": "iid",
            "budgets": "0.25,0.5",
            "eval-every": 100,  # round 0 and the last round
            "min-available-nodes": 3,
            "output-dir": str(tmp_path / method),
        },
        num_supernodes=3,
    )
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["accuracy"] > 0.2  # chance is 0.1
    assert all(r["participants"] == [0, 1, 2] and r["failures"] == [] for r in rows[1:])
    state = torch.load(out / MODEL_FILE)
    full = build_model("cnn").state_dict()
    narrow = method == "fedavg-small"
    assert (state["fc.weight"].shape == full["fc.weight"].shape) is not narrow
