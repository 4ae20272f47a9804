"""Bad updates never touch the global model; the same config and seed give the same run."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from msfusion_flwr.apps import run_experiment
from msfusion_flwr.config import RunConfig
from msfusion_flwr.device import participant
from msfusion_flwr.engine import SplitSpec, flat_positions
from msfusion_flwr.engine.policies import PlanRequest
from msfusion_flwr.models import build_model
from msfusion_flwr.protocol import ARRAYS, METRICS
from msfusion_flwr.server.methods import global_widths, make_strategy
from msfusion_flwr.server.reporting import MODEL_FILE, read_metrics, without_timing

QUICK = {"num-server-rounds": 1, "data-fraction": 0.03, "test-examples": 1000, "partitioner": "iid", "eval-every": 100, "seed": 3}


def tamper(reply: Message, partition_id: int) -> Message:
    """Partition 0 is honest; 1..6 send wrong shapes, NaN, a missing array, an extra array, a negative count, float64."""
    arrays = reply.content.array_records[ARRAYS]
    if partition_id == 1:
        arrays["fc.weight"] = Array(arrays["fc.weight"].numpy()[:-1])
    elif partition_id == 2:
        bad = arrays["conv2.0.weight"].numpy().copy()
        bad.flat[0] = np.nan
        arrays["conv2.0.weight"] = Array(bad)
    elif partition_id == 3:
        del arrays["head.bias"]
    elif partition_id == 4:
        arrays["backdoor"] = Array(np.zeros(3, dtype=np.float32))
    elif partition_id == 5:
        reply.content.metric_records[METRICS]["num-examples"] = -5.0
    elif partition_id == 6:
        arrays["fc.bias"] = Array(arrays["fc.bias"].numpy().astype(np.float64))
    return reply


def faulty_client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = participant.train(message, context)
        return tamper(reply, int(context.node_config["partition-id"]))

    app.query()(participant.query)
    return app


def test_bad_updates_are_left_out_with_reasons_and_never_touch_the_global_model(tmp_path):
    """Six faulty replies are rejected, each named; only the honest slice changes the global model.

    The messages go out in waves of 3 (``messages-in-flight``) through Flower's simulation engine's Grid."""
    out = run_experiment(
        {**QUICK, "min-available-nodes": 7, "messages-in-flight": 3, "output-dir": str(tmp_path / "run")},
        num_supernodes=7,
        client_app=faulty_client_app(),
    )
    row = read_metrics(out)[1]
    assert row["participants"] == [0]
    reasons = " | ".join(row["failures"])
    assert len(row["failures"]) == 6
    assert [f.split(" (node")[0] for f in row["failures"]] == [f"partition {p}" for p in range(1, 7)]
    for expected in ("shape", "non-finite", "array names differ", "must be at least 1", "has dtype float64, expected float32"):
        assert expected in reasons
    run = RunConfig.from_mapping(QUICK)
    widths = global_widths(run)  # msfusion's default: 2 blocks wide
    torch.manual_seed(QUICK["seed"])  # the server's initial model, its output layer calibrated
    initial = build_model("cnn", widths).state_dict()
    final = torch.load(out / MODEL_FILE)
    spec = SplitSpec.from_model(build_model("cnn", widths))
    strategy = make_strategy(run, spec)
    initial = strategy.initial_state(initial)
    honest_plan = strategy.policy.assign(PlanRequest(spec.widths, 0.25, 0, 7, 1)).plan  # rank 0 of 7, round 1
    positions = spec.positions(honest_plan)
    for key, tensor in final.items():
        assert torch.isfinite(tensor).all()
        held = torch.zeros(tensor.numel(), dtype=torch.bool)
        held[flat_positions(tensor.shape, positions.get(key, ())).reshape(-1)] = True
        untouched = ~held
        assert torch.equal(tensor.reshape(-1)[untouched], initial[key].reshape(-1)[untouched]), key
    assert not torch.equal(final["fc.weight"], initial["fc.weight"])  # the honest slice did train


def test_same_config_and_seed_give_identical_metrics_and_model(tmp_path):
    """Two runs of one config (contrastive loss on, 2 rounds) agree on everything but wall times."""
    runs = [
        run_experiment({**QUICK, "num-server-rounds": 2, "min-available-nodes": 3, "contrastive-weight": 1.0,
                        "output-dir": str(tmp_path / name)}, num_supernodes=3)
        for name in ("a", "b")
    ]
    first, second = (without_timing(read_metrics(r)) for r in runs)
    assert first == second
    assert first[-1]["accuracy"] is not None
    a, b = (torch.load(r / MODEL_FILE) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def expected_fault(seed: int, server_round: int, partition_id: int, dropout: float, straggler: float) -> str:
    """The fault a participant plays, from the documented seeded draw."""
    draw = np.random.default_rng([seed, server_round, partition_id, 0xFA17]).random()
    return "dropout" if draw < dropout else "straggler" if draw < dropout + straggler else "ok"


def test_dropouts_and_stragglers_are_left_out_and_named_and_the_run_goes_on(tmp_path):
    """Round 1 (seed 4): partition 0 straggles past the timeout, 2 drops out; both are named, the rest aggregated."""
    seed, dropout, straggler = 4, 0.3, 0.2
    out = run_experiment(
        {**QUICK, "seed": seed, "num-server-rounds": 2, "min-available-nodes": 5, "dropout-rate": dropout,
         "straggler-rate": straggler, "round-timeout": 20.0, "data-fraction": 0.02, "test-examples": 1000, "output-dir": str(tmp_path / "run")},
        num_supernodes=5,
    )
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        faults = {p: expected_fault(seed, row["round"], p, dropout, straggler) for p in range(5)}
        assert row["participants"] == [p for p, f in faults.items() if f == "ok"]
        named = {int(f.split()[1]): f for f in row["failures"]}
        assert set(named) == {p for p, f in faults.items() if f != "ok"}
        for p, failure in named.items():
            assert ("simulated dropout" if faults[p] == "dropout" else "no reply within the round timeout") in failure
    assert rows[1]["participants"] == [1, 3, 4] and rows[-1]["accuracy"] is not None
