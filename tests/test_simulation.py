"""End-to-end runs through Flower's in-process simulation engine."""

from __future__ import annotations

import json

import pytest
import torch

from msfusion_flwr.apps import run_experiment
from msfusion_flwr.config import MSFUSION_PAPER, RunConfig
from msfusion_flwr.models import build_model
from msfusion_flwr.protocol import array_bytes
from msfusion_flwr.server.methods import global_widths
from msfusion_flwr.server.reporting import CONFIG_FILE, CURVES_FILE, MODEL_FILE, read_metrics

QUICK = {
    "data-fraction": 0.1, "test-examples": 1000,
    "min-available-nodes": 4,
    "partitioner": "iid",
    "local-epochs": 1,
}


def full_model_bytes() -> int:
    from flwr.app import ArrayRecord

    return array_bytes(ArrayRecord(build_model("cnn").state_dict()))


def test_msfusion_simulation_learns_and_writes_outputs(tmp_path):
    """3 rounds, 4 participants at r = 0.25: beats chance, writes every output."""
    out = run_experiment(
        {**QUICK, "num-server-rounds": 3, "split-ratio": 0.25, "output-dir": str(tmp_path / "run")},
        num_supernodes=4,
    )
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["accuracy"] > 0.3  # chance is 0.1
    assert rows[-1]["loss"] < rows[0]["loss"]
    per_participant_full = full_model_bytes()
    for row in rows[1:]:
        assert row["participants"] == [0, 1, 2, 3]
        assert row["failures"] == []
        assert 0 < row["bytes_down"] <= 0.10 * per_participant_full * 4
        assert row["bytes_up"] == row["bytes_down"]
        assert 0 < row["server_s"] < row["wall_s"]  # the strategy's own work, measured, is part of the round
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["split-ratio"] == 0.25 and config["method"] == "msfusion"
    state = torch.load(out / MODEL_FILE)
    widths = global_widths(RunConfig.from_mapping(config))
    assert widths == {g: 2 * k // 4 for g, k in build_model("cnn").FULL_WIDTHS.items()}  # msfusion's default: 2 blocks
    build_model("cnn", widths).load_state_dict(state)  # the saved model is the global model
    assert (out / CURVES_FILE).stat().st_size > 0


def test_msfusion_at_full_width_without_contrastive_matches_flower_fedavg(tmp_path):
    """r = 1, mu = 0: MSfusion's global model equals Flower's FedAvg's (same data, seeds, client code).

    Flower's FedAvg sums replies in float32 in arrival order, so it is not
    bitwise reproducible even against itself: after 3 rounds two FedAvg runs
    differ by about 3e-4 (largest element), training amplifying rounding
    differences. Any real difference (another data order, the contrastive term,
    a wrong aggregation) moves weights by 1e-2 or more.
    """
    common = {
        **QUICK,
        "num-server-rounds": 3,
        "data-fraction": 0.05,
        "test-examples": 0,  # the whole test set: the accuracy check's tolerance is 30 of its 10,000 images
        "eval-every": 100,
        "seed": 7,
        "contrastive-weight": 0.0,
        "learning-rate": 0.01,
        "momentum": 0.0,
    }
    fedavg = run_experiment({**common, "method": "fedavg", "output-dir": str(tmp_path / "fedavg")}, num_supernodes=4)
    msfusion = run_experiment(  # the paper's rolling windows: at r = 1 every window is the whole model
        {**common, "method": "msfusion", "split-ratio": 1.0, **MSFUSION_PAPER, "contrastive-weight": 0.0, "output-dir": str(tmp_path / "msfusion")},
        num_supernodes=4,
    )
    a, b = torch.load(fedavg / MODEL_FILE), torch.load(msfusion / MODEL_FILE)
    torch.manual_seed(7)  # the server builds its initial model right after seeding
    initial = build_model("cnn").state_dict()
    assert a.keys() == b.keys()
    moved = 0.0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0.0, atol=3e-3)
        moved = max(moved, float((a[key] - initial[key]).abs().max()))
    assert moved > 3e-2  # both actually trained, well beyond the tolerance
    fedavg_rows, msfusion_rows = read_metrics(fedavg), read_metrics(msfusion)
    assert fedavg_rows[-1]["accuracy"] == pytest.approx(msfusion_rows[-1]["accuracy"], abs=3e-3)
    assert [r["participants"] for r in fedavg_rows] == [r["participants"] for r in msfusion_rows]
    assert [r["bytes_down"] for r in fedavg_rows] == [r["bytes_down"] for r in msfusion_rows]
