"""Learning-rate schedules end to end: every participant of a round trains at the rate the schedule gives it."""

from __future__ import annotations

import math

import pytest

from msfusion_flwr.device import training
from msfusion_flwr.experiments.loopback import run_in_process

RUN = {"num-server-rounds": 3, "data-fraction": 0.02, "test-examples": 200, "partitioner": "iid", "eval-every": 3,
       "min-available-nodes": 3, "learning-rate": 0.08, "learning-rate-schedule": "cosine"}  # fmt: skip


@pytest.mark.parametrize("method", ["msfusion", "fedavg"])
def test_participants_train_at_the_rate_of_their_round(tmp_path, monkeypatch, method):
    """Through the app's ServerApp and ClientApp (msfusion's strategy and Flower's FedAvg): 3 participants a
    round, each optimizer built at 0.08 (1 + cos(pi (t - 1) / 3)) / 2 in round t."""
    built = []
    make_optimizer = training.make_optimizer

    def recording(model, name, learning_rate, *args):
        built.append(learning_rate)
        return make_optimizer(model, name, learning_rate, *args)

    monkeypatch.setattr(training, "make_optimizer", recording)
    run_in_process({**RUN, "method": method, "output-dir": str(tmp_path)}, num_supernodes=3)
    expected = [0.08 * (1 + math.cos(math.pi * (t - 1) / 3)) / 2 for t in (1, 2, 3) for _ in range(3)]
    assert built == pytest.approx(expected, rel=1e-12)
