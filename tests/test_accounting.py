"""Per-participant resource accounting: FLOPs, peak memory, parameters, bytes, aggregates."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import TensorDataset

from msfusion_flwr.config import RunConfig
from msfusion_flwr.device.losses import Representation
from msfusion_flwr.device.metering import PeakTensorMemory, resident_tensors
from msfusion_flwr.device.training import TrainSettings, train_local
from msfusion_flwr.engine import SplitSpec, slice_state
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.models import build_model
from msfusion_flwr.protocol import ARRAYS, PLAN, client_config, decode_plan
from msfusion_flwr.server.methods import make_strategy
from two_layer import TwoLayer
from msfusion_flwr.server.reporting import CumulativeCosts, summarize_costs, without_timing


def run(model: nn.Module, n: int, batch: int, previous: Representation | None = None, mu: float = 0.0) -> dict:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(n, 12), torch.randint(0, 3, (n,)))
    hidden = model.head.in_features
    current = Representation(model, torch.arange(hidden), hidden)
    settings = TrainSettings(batch_size=batch, contrastive_weight=mu, learning_rate=0.01)
    return train_local(model, data, settings, current, previous)


def test_training_flops_equal_the_analytic_count():
    """FLOPs of training a 2-layer MLP: forward 2(dh + hc), backward 2hc (input grad) + 2(dh + hc) (weights)."""
    d, h, c, n = 12, 20, 3, 40
    metrics = run(TwoLayer(d, h, c), n=n, batch=8)
    per_example = 2 * (d * h + h * c) + 2 * h * c + 2 * (d * h + h * c)
    assert metrics["train-flops"] == per_example * n
    assert metrics["trained-params"] == d * h + h * c


def test_contrastive_term_adds_two_forward_passes_of_flops():
    """With a previous model and mu > 0, the frozen received and previous models' forwards are counted."""
    d, h, c, n = 12, 20, 3, 40
    previous_model = TwoLayer(d, h, c)
    previous = Representation(previous_model, torch.arange(h), h)
    plain = run(TwoLayer(d, h, c), n=n, batch=8)
    contrastive = run(TwoLayer(d, h, c), n=n, batch=8, previous=previous, mu=1.0)
    extra_forward = 2 * (2 * d * h)  # features() of the two frozen models: one matmul each
    # The cosine similarities are element-wise: the counter adds no FLOPs for them.
    assert contrastive["train-flops"] == plain["train-flops"] + extra_forward * n


def test_peak_memory_matches_pytorch_memtracker():
    """Peak tensor memory of a CNN step equals PyTorch's MemTracker total plus the batch."""
    MemTracker = pytest.importorskip("torch.distributed._tools.mem_tracker").MemTracker
    torch.manual_seed(0)
    model = build_model("cnn", {"conv1": 8, "conv2": 16, "conv3": 32, "fc": 64})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # optimizer state exists from here on
    with PeakTensorMemory(resident_tensors([model], optimizer, (x, y))) as mine:
        step()
    reference = MemTracker()
    reference.track_external(model, optimizer)
    with reference:
        step()
    total = sum(int(v["Total"]) for v in reference.get_tracker_snapshot("peak").values())
    assert mine.peak == total + x.nbytes + y.nbytes


def test_peak_memory_of_a_sub_model_is_smaller():
    """The measured peak memory shrinks with the width."""
    metrics = {}
    for name, widths in {"full": None, "quarter": {"conv1": 16, "conv2": 32, "conv3": 64, "fc": 128}}.items():
        torch.manual_seed(0)
        model = build_model("cnn", widths)
        data = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
        width = model.head.in_features
        metrics[name] = train_local(model, data, TrainSettings(), Representation(model, torch.arange(width), width), None)
    assert 0 < metrics["quarter"]["peak-memory-bytes"] < 0.5 * metrics["full"]["peak-memory-bytes"]
    assert metrics["quarter"]["train-flops"] < 0.15 * metrics["full"]["train-flops"]


def test_bytes_down_equal_the_sliced_arrays_nbytes():
    """The meter's bytes per node equal the nbytes of that node's sliced tensors."""
    config = RunConfig.from_mapping({"split-ratio": 0.25})
    model = build_model("cnn")
    spec = SplitSpec.from_model(model)
    strategy = make_strategy(config, spec)
    messages = strategy.configure_train(1, ArrayRecord(model.state_dict()), client_config(config), LoopbackGrid(4))
    traffic = strategy.meter.rounds[1]
    for message in messages:
        plan, _ = decode_plan(message.content.config_records[PLAN])
        expected = sum(t.nbytes for t in slice_state(model.state_dict(), spec, plan).values())
        assert traffic.sent_bytes[message.metadata.dst_node_id] == expected
        assert sum(a.numpy().nbytes for a in message.content.array_records[ARRAYS].values()) == expected
    assert traffic.bytes_down == sum(traffic.sent_bytes.values())


def test_round_and_cumulative_aggregates():
    """Per-round sums/maxima and per-participant cumulative totals of hand-made costs."""
    nan = math.nan
    round1 = [
        {"partition_id": 0, "bytes_down": 10, "bytes_up": 10, "flops": 100.0, "train_time_s": 1.0, "handler_time_s": 1.5, "trained_params": 5, "peak_memory_bytes": 50},
        {"partition_id": 1, "bytes_down": 30, "bytes_up": 30, "flops": 300.0, "train_time_s": 2.0, "handler_time_s": 2.5, "trained_params": 9, "peak_memory_bytes": 70},
    ]
    round2 = [
        {"partition_id": 0, "bytes_down": 10, "bytes_up": 10, "flops": 250.0, "train_time_s": nan, "handler_time_s": 1.0, "trained_params": 5, "peak_memory_bytes": 40},
    ]
    summary = summarize_costs(round1)
    assert summary["flops_sum"] == 400 and summary["flops_max"] == 300
    assert summary["bytes_down_sum"] == 40 and summary["peak_memory_bytes_max"] == 70
    assert summary["trained_params_max"] == 9 and "trained_params_sum" not in summary
    cumulative = CumulativeCosts()
    cumulative.add(round1)
    after = cumulative.add(round2)
    assert after["cum_flops"] == 650
    assert after["cum_flops_per_participant_max"] == 350  # participant 0: 100 + 250
    assert after["cum_train_time_s"] == 3.0  # a missing measurement adds nothing
    assert after["cum_handler_time_s"] == 5.0 and after["cum_handler_time_s_per_participant_max"] == 2.5
    resumed = CumulativeCosts()  # totals from a checkpoint written before handler_time_s was measured
    resumed.totals = {0: {"bytes_down": 10.0, "bytes_up": 10.0, "flops": 100.0, "train_time_s": 1.0}}
    assert resumed.add(round2)["cum_handler_time_s"] == 1.0
    summed = ("bytes_down", "bytes_up", "flops", "train_time_s", "handler_time_s")
    assert summarize_costs([]) == {**{f"{k}_sum": 0 for k in summed},
                                   **{f"{k}_max": 0.0 for k in (*summed, "trained_params", "peak_memory_bytes")}}


def test_rows_without_timing_keep_every_measurement_that_repeats():
    """Timed columns go at every depth (per participant, cumulative, FedDF's server costs); the rest stays."""
    row = {
        "round": 3, "accuracy": 0.5, "wall_s": 1.2, "elapsed_s": 9.0, "server_s": 0.3,
        "server_costs": {"distill_time_s": 2.0, "distill_flops": 7.0},
        "per_participant": [{"partition_id": 0, "flops": 100.0, "train_time_s": 1.0, "handler_time_s": 1.5}],
        "cum_train_time_s_per_participant_max": 4.0, "cum_flops": 650, "coverage": 0.4,
    }
    kept = {"round": 3, "accuracy": 0.5, "per_participant": [{"partition_id": 0, "flops": 100.0}], "cum_flops": 650, "coverage": 0.4}
    assert without_timing(row) == kept
    assert without_timing([row], left_out=("coverage",)) == [{k: v for k, v in kept.items() if k != "coverage"}]
