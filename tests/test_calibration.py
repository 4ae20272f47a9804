"""Output calibration by rule (``output-scaling = "calibrated"``): slices learn at any r, the fused model's outputs
are on the slices' scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from lm_corpus import lm_config, write_corpus

from msfusion_flwr.config import MSFUSION_PAPER, RunConfig
from msfusion_flwr.data import load_test_set, model_kwargs
from msfusion_flwr.device import participant
from msfusion_flwr.engine import (
    DoubleShift,
    SplitSpec,
    SubmodelUpdate,
    aggregate,
    plan_widths,
    slice_state,
)
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.models import build_model
from msfusion_flwr.models.evaluation import evaluate
from msfusion_flwr.protocol import client_config
from msfusion_flwr.server.methods import global_widths, make_strategy

R = 1 / 16
NOISE = 2.5
PARTICIPANTS = 16  # with even spacing at r = 1/16 their windows tile every group: each unit is held once


def noisy_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes, each a fixed random pattern, under enough noise that a narrow CNN errs now and then."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, 10, (n,), generator=g)
    return patterns[y] + NOISE * torch.randn(n, 1, 28, 28, generator=g), y


def train_slice(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 100) -> float:
    """SGD as the app's participants run it; the mean loss of the last 10 steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    losses = []
    for i in range(steps):
        idx = torch.arange(i * 32, (i + 1) * 32) % len(y)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


def one_round(scaling: str) -> dict[str, float]:
    """One round of 16 participants at r = 1/16 from the same global model; the slices' and the fused model's figures."""
    torch.manual_seed(0)
    global_model = build_model("cnn")
    spec = SplitSpec.from_model(global_model)
    state = global_model.state_dict()
    calibrate = scaling == "calibrated"
    if calibrate:  # as SubmodelStrategy.initial_state: slices start from the default initialisation
        factors = spec.calibration(DoubleShift().plan(spec.widths, R, 0, PARTICIPANTS, 1))
        state = {k: v * factors.get(k, 1.0) for k, v in state.items()}
    x, y = noisy_images(2000, seed=1)
    test_x, test_y = noisy_images(1000, seed=2)
    updates, slice_losses, slice_logit_norms = [], [], []
    for j in range(PARTICIPANTS):
        plan = DoubleShift().plan(spec.widths, R, j, PARTICIPANTS, 1)
        model = build_model("cnn", plan_widths(plan), R, classifier_scaling=scaling == "scaler")
        model.load_state_dict(slice_state(state, spec, plan, calibrate))
        slice_losses.append(train_slice(model, x, y))
        model.eval()
        with torch.no_grad():
            slice_logit_norms.append(float(model(test_x).norm(dim=1).mean()))
        updates.append(SubmodelUpdate(plan, model.state_dict(), 1.0))
    fused = build_model("cnn")
    fused.load_state_dict(aggregate(state, spec, updates, calibrate))
    fused.eval()
    with torch.no_grad():
        logits = fused(test_x)
    return {
        "slice_loss": max(slice_losses),
        "fused_loss": float(F.cross_entropy(logits, test_y)),
        "fused_accuracy": float((logits.argmax(1) == test_y).float().mean()),
        "scale_ratio": float(logits.norm(dim=1).mean()) / (sum(slice_logit_norms) / len(slice_logit_norms)),
    }


def test_calibrated_slices_learn_at_a_sixteenth_and_the_fused_model_keeps_their_scale():
    """Measured here: slices at loss 1.69 (chance 2.30) calibrated and without scaling, 2.34 with the Scaler;
    fused logits 0.54 times the slices' norm calibrated, 8.3 times without; fused loss 1.32 against 1.79."""
    calibrated, none, scaler = one_round("calibrated"), one_round("none"), one_round("scaler")
    assert scaler["slice_loss"] > 2.2  # the Scaler's 1/r^2 head learning rate stalls slices at chance
    assert calibrated["slice_loss"] < 0.8 * scaler["slice_loss"]  # calibrated slices learn
    assert abs(calibrated["slice_loss"] - none["slice_loss"]) < 1e-6  # and exactly as plain narrow models do
    assert 0.4 < calibrated["scale_ratio"] < 2.0  # the fused logits are on the slices' scale
    assert none["scale_ratio"] > 6.0  # without calibration: about 1/r = 16 windows' logits summed
    assert calibrated["fused_loss"] < calibrated["slice_loss"]  # the fused model's loss is not inflated
    assert none["fused_loss"] > none["slice_loss"]  # without calibration it is
    assert abs(calibrated["fused_accuracy"] - none["fused_accuracy"]) < 0.03  # the scale, not the ranking, changed


@settings(max_examples=20, deadline=None)
@given(
    ratios=st.lists(st.sampled_from([1 / 16, 1 / 8, 0.25, 0.5, 1.0]), min_size=1, max_size=4),
    server_round=st.integers(1, 50),
)
def test_calibrated_slicing_and_fusion_are_inverse_for_any_budgets(ratios, server_round):
    """Unchanged slices fuse back to the global state exactly, whatever each participant's budget."""
    torch.manual_seed(server_round)
    model = build_model("cnn", {"conv1": 8, "conv2": 16, "conv3": 16, "fc": 32})
    spec = SplitSpec.from_model(model)
    state = model.state_dict()
    updates = []
    for j, r in enumerate(ratios):
        plan = DoubleShift().plan(spec.widths, r, j, len(ratios), server_round)
        sliced = slice_state(state, spec, plan, calibrate=True)
        fraction = len(plan["fc"]) / spec.widths["fc"]
        torch.testing.assert_close(sliced["head.weight"] * fraction, state["head.weight"][:, plan["fc"]])
        updates.append(SubmodelUpdate(plan, sliced, 1.0 + j))
    fused = aggregate(state, spec, updates, calibrate=True)
    for key in state:
        torch.testing.assert_close(fused[key], state[key], rtol=1e-6, atol=1e-7)


def test_every_model_calibrates_exactly_its_output_layer():
    """The rule needs no declaration: the output layers are the split tensors that only read split features."""
    expected = {"cnn": ["head.weight"], "preresnet18": ["head.weight"], "transformer": ["head.weight"], "gpt2": ["model.lm_head.weight"]}
    for name, layers in expected.items():
        kwargs = {"vocab_size": 50} if name in ("transformer", "gpt2") else {}
        spec = SplitSpec.from_model(build_model(name, **kwargs))
        assert spec.output_layers == layers
        plan = DoubleShift().plan(spec.widths, 0.25, 0, 4, 1)
        assert all(abs(f - 0.25) < 0.02 for f in spec.calibration(plan).values())


def lm_perplexities(corpus: str, scaling: str, rounds: int = 5) -> list[float]:
    """Test perplexity of the fused Transformer LM after each of ``rounds`` MSfusion rounds (4 participants, r = 1/4;
    the paper's rolling windows over the full model, whose fused outputs sum windows trained apart)."""
    torch.manual_seed(0)
    paper = {**MSFUSION_PAPER, "contrastive-weight": 0.0}
    config = RunConfig.from_mapping(lm_config(corpus, method="msfusion", **{"output-scaling": scaling, **paper}))
    global_model = build_model("transformer", global_widths(config), **model_kwargs(config.data))
    strategy = make_strategy(config, SplitSpec.from_model(global_model))
    global_model.load_state_dict(strategy.initial_state(global_model.state_dict()))
    test_set, grid = load_test_set(config.data), LoopbackGrid(4)
    arrays, perplexities = ArrayRecord(global_model.state_dict()), []
    for server_round in range(1, rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, client_config(config), grid))
        replies = [participant.train(m, grid.contexts[m.metadata.dst_node_id]) for m in messages]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        global_model.load_state_dict(arrays.to_torch_state_dict())
        perplexities.append(evaluate(global_model, test_set)["perplexity"])
    return perplexities


def test_a_calibrated_lm_run_does_not_diverge(tmp_path):
    """Measured here: calibrated 31.9, 23.4, 19.0, 16.1, 14.1; without scaling 18.3, 13.8, 15.5, 20.9, 26.3 (it diverges)."""
    corpus = write_corpus(tmp_path / "wikitext")
    calibrated, none = lm_perplexities(corpus, "calibrated"), lm_perplexities(corpus, "none")
    assert all(later < earlier for earlier, later in zip(calibrated, calibrated[1:]))
    assert none[-1] > 1.5 * min(none)  # the uncalibrated fused model's perplexity turns and grows
    assert calibrated[-1] < none[-1]
