"""What a participant receives, builds, trains and returns (no Flower engine)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord

from msfusion_flwr import models
from msfusion_flwr.config import MSFUSION_PAPER, RunConfig
from msfusion_flwr.device import participant
from msfusion_flwr.engine import SplitSpec
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.models import registry
from msfusion_flwr.protocol import ARRAYS, METRICS, PLAN, client_config, decode_plan
from msfusion_flwr.server.methods import make_strategy


def round_messages(config: dict, grid: LoopbackGrid, server_round: int, state: dict) -> dict:
    """One round's messages from a strategy over the full CNN: msfusion as the paper reads it (rolling windows over
    the full model, the contrastive term), unless ``config`` says otherwise."""
    resolved = RunConfig.from_mapping({**MSFUSION_PAPER, **config})
    strategy = make_strategy(resolved, SplitSpec.from_model(models.build_model("cnn")))
    messages = strategy.configure_train(server_round, ArrayRecord(state), client_config(resolved), grid)
    return {m.metadata.dst_node_id: m for m in messages}


def test_participant_trains_a_narrow_model_and_never_builds_the_full_one(monkeypatch):
    """At r = 0.25 the participant's model, what it receives and returns are the sub-model's size."""
    built_widths = []
    real_build = models.build_model

    def recording_build(name, widths=None, rate=1.0, **kwargs):
        built_widths.append(None if widths is None else dict(widths))
        return real_build(name, widths, rate, **kwargs)

    full = real_build("cnn")
    full_params = sum(p.numel() for p in full.parameters())
    grid = LoopbackGrid(4)
    config = {"split-ratio": 0.25, "data-fraction": 0.02, "partitioner": "iid"}
    monkeypatch.setattr(registry, "build_model", recording_build)
    for server_round in (1, 2):  # round 2 also rebuilds the previous sub-model for z_p
        messages = round_messages(config, grid, server_round, full.state_dict())
        message = messages[1]
        plan, widths = decode_plan(message.content.config_records[PLAN])
        reply = participant.train(message, grid.contexts[1])
        sent = message.content.array_records[ARRAYS].to_torch_state_dict()
        returned = reply.content.array_records[ARRAYS].to_torch_state_dict()
        expected = real_build("cnn", {g: len(i) for g, i in plan.items()}, 0.25)
        expected_params = sum(p.numel() for p in expected.parameters())
        assert {k: v.shape for k, v in sent.items()} == {k: v.shape for k, v in expected.state_dict().items()}
        assert {k: v.shape for k, v in returned.items()} == {k: v.shape for k, v in sent.items()}
        assert sum(v.numel() for v in returned.values()) == expected_params < 0.1 * full_params
        assert widths == models.FashionCNN.FULL_WIDTHS
        if server_round == 2:
            assert reply.content.metric_records[METRICS]["train-contrastive"] > 0
    assert built_widths and all(w is not None and w != models.FashionCNN.FULL_WIDTHS for w in built_widths)


@pytest.mark.parametrize("scaling", ["calibrated", "scaler", "none"])
def test_sub_model_slices_are_the_global_values_at_the_plan_indices(scaling):
    """Each message carries the global tensor indexed at its plan, nothing else; calibrated, the
    classifier's weights are also divided by the fraction of its inputs the slice holds (w/K)."""
    torch.manual_seed(0)
    full = models.build_model("cnn").state_dict()
    grid = LoopbackGrid(3)
    messages = round_messages({"split-ratio": 0.5, "output-scaling": scaling}, grid, 3, full)
    for message in messages.values():
        plan, widths = decode_plan(message.content.config_records[PLAN])
        sent = message.content.array_records[ARRAYS].to_torch_state_dict()
        expected = full["conv2.0.weight"][plan["conv2"]][:, plan["conv1"]]
        torch.testing.assert_close(sent["conv2.0.weight"], expected, rtol=0, atol=0)
        fraction = len(plan["fc"]) / widths["fc"] if scaling == "calibrated" else 1.0
        torch.testing.assert_close(sent["head.weight"], full["head.weight"][:, plan["fc"]] / fraction, rtol=0, atol=0)
        torch.testing.assert_close(sent["head.bias"], full["head.bias"], rtol=0, atol=0)


def test_participant_builds_its_model_with_the_configured_classifier_scaler(monkeypatch):
    """``output-scaling`` reaches the participant's narrow model: head Scaler rate r with the Scaler, else 1."""
    built = []
    real_build = models.build_model

    def recording_build(name, widths=None, rate=1.0, **kwargs):
        built.append(real_build(name, widths, rate, **kwargs))
        return built[-1]

    monkeypatch.setattr(registry, "build_model", recording_build)
    full = real_build("cnn").state_dict()
    for scaling, expected_rate in (("scaler", 0.25), ("none", 1.0), ("calibrated", 1.0)):
        built.clear()
        config = {"split-ratio": 0.25, "data-fraction": 0.02, "partitioner": "iid", "output-scaling": scaling}
        grid = LoopbackGrid(4)
        participant.train(round_messages(config, grid, 1, full)[0], grid.contexts[0])
        assert built and all(m.head_scaler.rate == expected_rate and m.fc_scaler.rate == 0.25 for m in built)


def test_with_a_state_dir_the_previous_sub_model_lives_on_disk_not_in_the_context(tmp_path):
    """Two rounds of one participant: with participant-state-dir its Context.state holds no sub-model between
    rounds (a simulation's driver keeps every node's Context), and round 2 trains exactly as with Context.state."""
    full = models.build_model("cnn")
    config = {"split-ratio": 0.25, "data-fraction": 0.02, "partitioner": "iid", "seed": 5}
    replies = {}
    for name, extra in (("context", {}), ("disk", {"participant-state-dir": str(tmp_path / "state")})):
        grid = LoopbackGrid(4)
        for server_round in (1, 2):
            reply = participant.train(round_messages({**config, **extra}, grid, server_round, full.state_dict())[1], grid.contexts[1])
            kept = set(grid.contexts[1].state.array_records)
            assert kept == (set() if extra else {"msfusion.previous-arrays"}), (name, kept)
        assert reply.content.metric_records[METRICS]["train-contrastive"] > 0  # round 2 used the previous sub-model
        replies[name] = reply.content.array_records[ARRAYS].to_torch_state_dict()
    assert (tmp_path / "state" / "partition-1.pt").is_file()
    for key, value in replies["context"].items():
        assert torch.equal(replies["disk"][key], value), key
