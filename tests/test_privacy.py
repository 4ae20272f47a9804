"""Differential privacy for partial updates: the accountant's epsilon, the per-element noise, the device's clipping."""

from __future__ import annotations

import math

import pytest
import torch

from msfusion_flwr.config import ConfigError, PrivacySettings, RunConfig, resolve_config
from msfusion_flwr.device.privacy import clip_update
from msfusion_flwr.engine import SplitSpec, SubmodelUpdate, aggregate
from msfusion_flwr.engine.robust import AggregationRule
from msfusion_flwr.experiments.loopback import run_in_process
from msfusion_flwr.models import build_model
from msfusion_flwr.server.methods import make_strategy
from msfusion_flwr.server.privacy import epsilon
from msfusion_flwr.server.reporting import read_metrics


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism with sensitivity / std = mu at ``delta``
    (Balle & Wang 2018: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)), by bisection."""

    def delta_of(eps: float) -> float:
        return normal_cdf(-eps / mu + mu / 2) - math.exp(eps) * normal_cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def classic_rdp_epsilon(mu: float, delta: float) -> float:
    """The textbook RDP bound for the same mechanism: min over alpha of alpha mu^2 / 2 + log(1/delta) / (alpha - 1)."""
    return min(a * mu**2 / 2 + math.log(1 / delta) / (a - 1) for a in (1 + i / 100 for i in range(1, 100000)))


@pytest.mark.parametrize(("noise", "rounds"), [(2.0, 1), (4.0, 10), (8.0, 50), (20.0, 200)])
def test_full_participation_epsilon_sits_between_the_exact_gaussian_and_the_textbook_rdp_bound(noise, rounds):
    """Every participant in every round: T rounds of noise z with replace-one sensitivity 2 compose to one
    Gaussian with mu = 2 sqrt(T) / z; the accountant's epsilon is an upper bound on its exact epsilon and
    no looser than the textbook RDP conversion."""
    delta = 1e-5
    mu = 2 * math.sqrt(rounds) / noise
    spent = epsilon(noise, rounds, 10, 10, delta)
    exact = exact_gaussian_epsilon(mu, delta)
    assert exact <= spent <= classic_rdp_epsilon(mu, delta) * 1.001
    assert spent < 1.6 * exact  # RDP is not far from exact for the Gaussian mechanism


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    base = epsilon(4.0, 20, 10, 10, 1e-5)
    assert epsilon(4.0, 40, 10, 10, 1e-5) > base > epsilon(8.0, 20, 10, 10, 1e-5)
    assert epsilon(4.0, 20, 10, 100, 1e-5) < base  # 10 of 100 nodes per round
    assert epsilon(4.0, 0, 10, 10, 1e-5) == 0.0 and epsilon(0.0, 3, 10, 10, 1e-5) == math.inf


def test_noise_on_each_element_is_calibrated_to_its_holders():
    """Two identical updates, one holding every unit, one half of them: noise std sigma / 2 where both
    held an element, sigma where one did; unheld elements and integer buffers keep their value."""
    model = build_model("cnn", {"conv1": 8, "conv2": 8, "conv3": 8, "fc": 64})
    spec = SplitSpec.from_model(model)
    state = model.state_dict()
    full = spec.full_plan()
    half = {name: torch.arange(spec.widths[name] // 2) for name in spec.widths}
    from msfusion_flwr.engine import slice_state

    updates = [SubmodelUpdate(full, state, 1.0), SubmodelUpdate(half, slice_state(state, spec, half), 1.0)]
    sigma = 0.5
    rule = AggregationRule(weighting="equal", noise_std=sigma)
    merged = aggregate(state, spec, updates, rule=rule, generator=torch.Generator().manual_seed(0))
    key = "fc.weight"  # (64 out, 8*... in): split on both dims
    noise = (merged[key] - state[key]).double()
    both = torch.zeros_like(noise, dtype=torch.bool)
    both[: spec.widths["fc"] // 2, : noise.shape[1] // 2] = True
    assert abs(float(noise[both].std()) - sigma / 2) < 0.05 * sigma
    assert abs(float(noise[~both].std()) - sigma) < 0.05 * sigma
    for key, value in state.items():
        if not value.is_floating_point():
            assert torch.equal(merged[key], value), key
    assert not torch.equal(aggregate(state, spec, updates, rule=rule)["fc.bias"], merged["fc.bias"])  # fresh draws


def test_device_clips_its_update_to_the_bound_and_keeps_its_direction():
    gen = torch.Generator().manual_seed(0)
    received = {"w": torch.randn(10, 10, generator=gen), "b": torch.randn(10, generator=gen), "n": torch.tensor(3)}
    trained = {"w": received["w"] + torch.randn(10, 10, generator=gen), "b": received["b"] + 1.0, "n": torch.tensor(8)}
    delta = torch.cat([(trained[k] - received[k]).reshape(-1) for k in ("w", "b")])
    sent = clip_update(received, trained, 1.0)
    clipped = torch.cat([(sent[k] - received[k]).reshape(-1) for k in ("w", "b")])
    assert abs(float(clipped.norm()) - 1.0) < 1e-5
    torch.testing.assert_close(clipped, delta / delta.norm())
    assert torch.equal(sent["n"], trained["n"])
    loose = clip_update(received, trained, 1e3)
    assert all(torch.allclose(loose[k], trained[k]) for k in ("w", "b"))


def test_noise_needs_the_aggregation_its_analysis_assumes():
    """dp-noise-multiplier > 0: dp-clip > 0, the unweighted mean, no clip-updates; each missing one is a one-line error."""
    dp = {"dp-noise-multiplier": 1.0, "dp-clip": 1.0, "aggregation-weights": "equal"}
    for missing, bad in (("dp-clip", 0.0), ("aggregation-weights", "examples"), ("aggregation", "median"), ("clip-updates", 1.0), ("screen-updates", True)):
        with pytest.raises(ConfigError, match=f"'{missing}'") as info:
            resolve_config({**dp, missing: bad})
        assert "\n" not in str(info.value)
    run = RunConfig.from_mapping(dp)
    assert run.privacy == PrivacySettings(clip=1.0, noise_multiplier=1.0)
    spec = SplitSpec.from_model(build_model("cnn"))
    assert make_strategy(run, spec).rule.noise_std == 1.0  # z * C
    fedavg = make_strategy(RunConfig.from_mapping({**dp, "method": "fedavg"}), spec)
    assert fedavg.rule.noise_std == 1.0  # FedAvg through the engine


def test_a_private_run_reports_the_accountants_epsilon_every_round(tmp_path):
    """Through the app's ServerApp and ClientApp (in process): 3 participants, 2 rounds, clip 1, noise 2: the model stays finite and metrics.jsonl has
    epsilon(2, t, 3, 3, 1e-5) after round t."""
    config = {
        "num-server-rounds": 2, "data-fraction": 0.03, "test-examples": 1000, "partitioner": "iid", "eval-every": 100, "min-available-nodes": 3,
        "dp-clip": 1.0, "dp-noise-multiplier": 2.0, "aggregation-weights": "equal", "output-dir": str(tmp_path / "run"),
    }  # fmt: skip
    rows = read_metrics(run_in_process(config, num_supernodes=3))
    assert [r["dp_epsilon"] for r in rows] == pytest.approx([epsilon(2.0, t, 3, 3, 1e-5) for t in range(3)])
    assert rows[-1]["participants"] == [0, 1, 2] and math.isfinite(rows[-1]["loss"])
