"""Simulated attackers: who attacks, what each attack sends, and a run that plain aggregation loses and robust wins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msfusion_flwr.config import FaultSettings
from msfusion_flwr.device.faults import attack_update, is_attacker
from msfusion_flwr.experiments.loopback import run_in_process
from msfusion_flwr.server.reporting import read_metrics


@pytest.mark.parametrize(("fraction", "num_partitions", "count"), [(0.0, 10, 0), (0.2, 10, 2), (0.3, 10, 3), (0.1, 40, 4), (1.0, 5, 5)])
def test_a_fixed_seeded_fraction_of_partitions_attacks(fraction, num_partitions, count):
    """round(fraction x N) partitions attack, the same for a seed, different across seeds; attack 'none' never."""
    faults = FaultSettings(attack="sign-flip", attack_fraction=fraction)
    chosen = {p for p in range(num_partitions) if is_attacker(faults, 7, p, num_partitions)}
    assert len(chosen) == count
    assert chosen == {p for p in range(num_partitions) if is_attacker(faults, 7, p, num_partitions)}
    if 0 < count < num_partitions:
        others = [{p for p in range(num_partitions) if is_attacker(faults, s, p, num_partitions)} for s in range(8)]
        assert len({frozenset(o) for o in others}) > 1
    assert not any(is_attacker(FaultSettings(attack_fraction=fraction), 7, p, num_partitions) for p in range(num_partitions))


def states():
    gen = torch.Generator().manual_seed(0)
    received = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen), "n": torch.tensor(5)}
    trained = {"w": received["w"] + 0.1 * torch.randn(4, 3, generator=gen), "b": received["b"] + 0.2, "n": torch.tensor(9)}
    return received, trained


@pytest.mark.parametrize(
    ("attack", "expected_delta", "count"),
    [("scale", 10.0, 50.0), ("sign-flip", -10.0, 50.0), ("inflate-count", -10.0, 500.0)],
)
def test_scaled_and_flipped_updates_follow_their_definition(attack, expected_delta, count):
    """received + s * delta (scale), received - s * delta (sign-flip, inflate-count, which also claims s x n)."""
    received, trained = states()
    sent, claimed = attack_update(FaultSettings(attack=attack, attack_fraction=1.0), received, trained, 50.0, 0, 1, 0)
    for key in ("w", "b"):
        torch.testing.assert_close(sent[key], received[key] + expected_delta * (trained[key] - received[key]))
    assert torch.equal(sent["n"], trained["n"])  # integer buffers as trained
    assert claimed == count


def test_random_updates_have_the_honest_scale_times_s_and_are_seeded():
    """Noise around the received state, of s times the honest delta's RMS per tensor; one draw per (round, participant)."""
    received = {"w": torch.zeros(200, 100)}
    trained = {"w": torch.full((200, 100), 0.5)}
    faults = FaultSettings(attack="random", attack_fraction=1.0, attack_scale=4.0)
    sent, claimed = attack_update(faults, received, trained, 10.0, 0, 1, 3)
    assert claimed == 10.0
    assert abs(float(sent["w"].std()) - 2.0) < 0.05 and abs(float(sent["w"].mean())) < 0.05
    again, _ = attack_update(faults, received, trained, 10.0, 0, 1, 3)
    other, _ = attack_update(faults, received, trained, 10.0, 0, 2, 3)
    assert torch.equal(sent["w"], again["w"]) and not torch.equal(sent["w"], other["w"])


def test_one_attacker_wrecks_plain_aggregation_and_robust_aggregation_learns(tmp_path):
    """MSfusion, 5 participants (the app's ServerApp and ClientApp, in process), 1 sending its update scaled by 1e4: the plain mean's loss explodes and its
    accuracy stays near chance; with clip-updates = 1, or with updates scored against the server's references
    (aggregation-weights = "reference"), the run learns as the clean runs of this size do.

    Near chance is under 0.3: a blown-up model's accuracy depends on float rounding (0.228 with one torch thread,
    under 0.2 with two); its loss above 100 (or not finite) does not."""
    base = {
        "num-server-rounds": 2, "data-fraction": 0.04, "test-examples": 1000, "partitioner": "iid", "seed": 3, "eval-every": 100,
        "min-available-nodes": 5, "contrastive-weight": 0.0, "attack": "scale", "attack-fraction": 0.2,
        "attack-scale": 1e4,
    }  # fmt: skip
    attacker = [p for p in range(5) if is_attacker(FaultSettings(attack="scale", attack_fraction=0.2), 3, p, 5)]
    results = {}
    rules = {"plain": {}, "robust": {"clip-updates": 1.0},
             "reference": {"aggregation-weights": "reference", "server-data-fraction": 0.02}}  # fmt: skip
    for name, rule in rules.items():
        out = run_in_process({**base, **rule, "output-dir": str(tmp_path / name)}, num_supernodes=5)
        rows = read_metrics(out)
        assert all(r["participants"] == list(range(5)) for r in rows[1:])  # the attacker's replies pass the checks
        assert attacker and attacker[0] in rows[1]["participants"]
        results[name] = rows[-1]
    plain_loss = results["plain"]["loss"]
    assert results["plain"]["accuracy"] < 0.3 and (plain_loss is None or not np.isfinite(plain_loss) or plain_loss > 100)
    for name in ("robust", "reference"):
        assert results[name]["accuracy"] > 0.5 and results[name]["loss"] < 1.6, name
