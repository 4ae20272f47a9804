"""Codistillation toward the participant's previous sub-model (``codistill-weight``, issue 12)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import TensorDataset

from msfusion_flwr import models
from msfusion_flwr.config import ConfigError, RunConfig
from msfusion_flwr.device import participant
from msfusion_flwr.device.losses import Representation, codistillation_loss
from msfusion_flwr.device.training import TrainSettings, train_local
from msfusion_flwr.engine import SplitSpec
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.protocol import CONFIG, METRICS, client_config
from msfusion_flwr.server.methods import make_strategy
from two_layer import TwoLayer


def naive_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """T^2 * mean over rows of sum_c p_t(c) (log p_t(c) - log p_s(c)), in float64 loops."""
    rows = student.reshape(-1, student.shape[-1]).double().tolist()
    targets = teacher.reshape(-1, teacher.shape[-1]).double().tolist()
    total = 0.0
    for s_row, t_row in zip(rows, targets, strict=True):
        s_norm = math.log(sum(math.exp(v / temperature) for v in s_row))
        t_norm = math.log(sum(math.exp(v / temperature) for v in t_row))
        for s, t in zip(s_row, t_row, strict=True):
            log_pt, log_ps = t / temperature - t_norm, s / temperature - s_norm
            total += math.exp(log_pt) * (log_pt - log_ps)
    return temperature**2 * total / len(rows)


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 7)])  # images (B, C); an LM's (B, L, V)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_codistillation_loss_is_the_scaled_kl_of_its_definition(shape, temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(shape) * 2, torch.randn(shape) * 2
    assert codistillation_loss(student, teacher, temperature).item() == pytest.approx(naive_kl(student, teacher, temperature), rel=1e-5)
    assert codistillation_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)


def run(student: nn.Module, previous: Representation | None, beta: float, epochs: int = 1, n: int = 40) -> dict:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(n, 12), torch.randint(0, 3, (n,)))
    hidden = student.head.in_features
    settings = TrainSettings(batch_size=8, learning_rate=0.05, epochs=epochs, codistill_weight=beta)
    return train_local(student, data, settings, Representation(student, torch.arange(hidden), hidden), previous)


def test_codistillation_adds_one_teacher_forward_and_reports_its_loss():
    """The previous model's full forward (features and head) is counted; without a previous model nothing changes."""
    d, h, c, n = 12, 20, 3, 40
    torch.manual_seed(1)
    previous = Representation(TwoLayer(d, h, c), torch.arange(h), h)
    torch.manual_seed(2)
    start = TwoLayer(d, h, c).state_dict()

    def fresh() -> TwoLayer:
        model = TwoLayer(d, h, c)
        model.load_state_dict(start)
        return model

    plain_model, first_round_model = fresh(), fresh()
    plain = run(plain_model, None, beta=0.0)
    first_round = run(first_round_model, None, beta=1.0)  # no previous sub-model yet: cross-entropy only
    assert first_round["train-codistill"] == 0.0 and first_round["train-loss"] == plain["train-loss"]
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), first_round_model.parameters(), strict=True))
    distilled = run(fresh(), previous, beta=1.0)
    assert distilled["train-flops"] == plain["train-flops"] + 2 * (d * h + h * c) * n
    assert distilled["train-codistill"] > 0
    assert distilled["train-loss"] == pytest.approx(distilled["train-ce"] + distilled["train-codistill"])


def test_codistillation_pulls_the_student_toward_the_teacher():
    """After training, the student's predictions are closer to the teacher's the larger the weight."""
    d, h, c = 12, 20, 3
    torch.manual_seed(3)
    teacher = TwoLayer(d, h, c)
    previous = Representation(teacher, torch.arange(h), h)
    torch.manual_seed(4)
    start = TwoLayer(d, h, c).state_dict()
    probe = torch.randn(200, d)
    distances = []
    for beta in (0.0, 1.0, 10.0):
        student = TwoLayer(d, h, c)
        student.load_state_dict(start)
        run(student, previous, beta=beta, epochs=5)
        with torch.no_grad():
            distances.append(codistillation_loss(student(probe), teacher(probe), 1.0).item())
    assert distances[0] > distances[1] > distances[2]


def test_only_msfusion_codistills_and_a_negative_weight_is_refused():
    for method in ("msfusion", "fedrolex", "heterofl"):
        resolved = RunConfig.from_mapping({"method": method, "codistill-weight": 0.5, "window-layout": "rolling", "block-count": 0})
        assert client_config(resolved)["codistill-weight"] == (0.5 if method == "msfusion" else 0.0)
    with pytest.raises(ConfigError, match="codistill-weight"):
        RunConfig.from_mapping({"codistill-weight": -1.0})
    with pytest.raises(ConfigError, match="codistill-temperature"):
        RunConfig.from_mapping({"codistill-temperature": 0.0})


def test_a_participant_codistills_from_the_block_it_trained_last_round():
    """Default msfusion (2 blocks that trade participants): round 1 has no teacher; in round 2 each participant holds
    the other block and distils toward the one it trained in round 1, kept in its Context."""
    full = models.build_model("cnn")
    grid = LoopbackGrid(4)
    resolved = RunConfig.from_mapping({"split-ratio": 0.25, "data-fraction": 0.02, "partitioner": "iid", "codistill-weight": 1.0})
    strategy = make_strategy(resolved, SplitSpec.from_model(full))
    state = full.state_dict()
    for server_round, expect_teacher in ((1, False), (2, True)):
        messages = strategy.configure_train(server_round, ArrayRecord(state), client_config(resolved), grid)
        for message in messages:
            assert message.content.config_records[CONFIG]["codistill-weight"] == 1.0
            reply = participant.train(message, grid.contexts[message.metadata.dst_node_id])
            metrics = reply.content.metric_records[METRICS]
            assert (metrics["train-codistill"] > 0) == expect_teacher
            assert metrics["train-contrastive"] == 0.0
