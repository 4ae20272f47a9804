"""Local training pieces: the contrastive loss, feature placement, train_local and evaluate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn
from torch.utils.data import TensorDataset

from msfusion_flwr.device.losses import Representation, contrastive_loss, embed_features
from msfusion_flwr.device.training import TrainSettings, frozen_copy, train_local
from msfusion_flwr.models import build_model
from msfusion_flwr.models.evaluation import evaluate


def cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def hand_contrastive(z, zg, zp, tau) -> float:
    """-log(e^{cos(z,zg)/tau} / (e^{cos(z,zg)/tau} + e^{cos(z,zp)/tau})), mean over rows."""
    terms = []
    for a, g, p in zip(z, zg, zp):
        pos, neg = math.exp(cos(a, g) / tau), math.exp(cos(a, p) / tau)
        terms.append(-math.log(pos / (pos + neg)))
    return sum(terms) / len(terms)


def test_contrastive_loss_known_vectors():
    """On hand-picked vectors the loss equals the formula computed with math."""
    z = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    zg = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # cos = 1, 1/sqrt(2)
    zp = [[0.0, 1.0, 0.0], [-1.0, -1.0, 0.0]]  # cos = 0, -1
    tau = 0.5
    got = contrastive_loss(torch.tensor(z), torch.tensor(zg), torch.tensor(zp), tau).item()
    first = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    second = -math.log(math.exp(math.sqrt(2)) / (math.exp(math.sqrt(2)) + math.exp(-2)))
    assert got == pytest.approx((first + second) / 2, rel=1e-6)
    assert got == pytest.approx(hand_contrastive(z, zg, zp, tau), rel=1e-6)


def test_contrastive_loss_equal_similarities_is_log2():
    """When z is as close to z_prev as to z_global the loss is log 2 for any temperature."""
    z = torch.tensor([[1.0, 2.0, 3.0]])
    for tau in (0.1, 0.5, 2.0):
        assert contrastive_loss(z, 2 * z, 3 * z, tau).item() == pytest.approx(math.log(2), rel=1e-6)


vectors = arrays(np.float64, (3, 4), elements=st.floats(-5, 5, allow_nan=False, allow_infinity=False))


@settings(max_examples=60, deadline=None)
@given(z=vectors, zg=vectors, zp=vectors, tau=st.floats(min_value=0.05, max_value=5.0))
def test_contrastive_loss_matches_hand_formula(z, zg, zp, tau):
    """On random batches the loss equals the per-row formula averaged over the batch."""
    for m in (z, zg, zp):
        assume(np.linalg.norm(m, axis=1).min() > 0.1)
    got = contrastive_loss(torch.from_numpy(z), torch.from_numpy(zg), torch.from_numpy(zp), tau).item()
    assert got == pytest.approx(hand_contrastive(z.tolist(), zg.tolist(), zp.tolist(), tau), rel=1e-7, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(width=st.integers(min_value=1, max_value=12), batch=st.integers(min_value=1, max_value=4), data=st.data())
def test_embed_features_places_units(width, batch, data):
    """Feature k lands at global unit feature_index[k]; units not held are zero."""
    index = data.draw(st.lists(st.integers(0, width - 1), min_size=1, max_size=width, unique=True))
    z = torch.arange(1, batch * len(index) + 1, dtype=torch.float32).view(batch, len(index))
    full = embed_features(z, torch.tensor(index, dtype=torch.long), width)
    assert full.shape == (batch, width)
    for row in range(batch):
        for unit in range(width):
            expected = z[row, index.index(unit)].item() if unit in index else 0.0
            assert full[row, unit].item() == expected


def test_embed_features_full_width_is_identity():
    """A sub-model holding every unit in order keeps its features as they are."""
    z = torch.randn(3, 5)
    assert torch.equal(embed_features(z, torch.arange(5), 5), z)


def test_embed_features_keeps_gradient():
    """Embedded features stay differentiable w.r.t. the sub-model's features."""
    z = torch.randn(2, 3, requires_grad=True)
    embed_features(z, torch.tensor([4, 0, 2]), 6).sum().backward()
    assert torch.equal(z.grad, torch.ones(2, 3))


# --------------------------------------------------------------------------- train_local

SMALL = {"conv1": 4, "conv2": 4, "conv3": 4, "fc": 6}
GLOBAL_FC = 12


@pytest.fixture
def tiny_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (9,), generator=gen)
    return TensorDataset(x, y)


def make(widths=SMALL, seed=0):
    torch.manual_seed(seed)
    return build_model("cnn", widths, rate=0.5)


FAST = dict(epochs=1, batch_size=4, learning_rate=0.01)


def test_train_local_without_previous_has_no_contrastive_term(tiny_data):
    """With no previous sub-model only cross-entropy is used: train-contrastive is 0."""
    model = make()
    current = Representation(model, torch.arange(3, 9), GLOBAL_FC)
    out = train_local(model, tiny_data, TrainSettings(**FAST, contrastive_weight=1.0), current, None)
    assert out["train-contrastive"] == 0.0
    assert out["train-loss"] == pytest.approx(out["train-ce"])
    assert out["num-examples"] == 9.0
    assert out["train-steps"] == 2.0  # batches of 4, 4 and 1; the single-example batch is skipped


def test_train_local_zero_weight_has_no_contrastive_term(tiny_data):
    """contrastive-weight 0 disables the term even when a previous sub-model exists."""
    model = make()
    previous = Representation(frozen_copy(make(seed=5)), torch.arange(0, 6), GLOBAL_FC)
    current = Representation(model, torch.arange(3, 9), GLOBAL_FC)
    out = train_local(model, tiny_data, TrainSettings(**FAST, contrastive_weight=0.0), current, previous)
    assert out["train-contrastive"] == 0.0
    assert out["train-loss"] == pytest.approx(out["train-ce"])


def test_train_local_with_previous_reports_contrastive_term(tiny_data):
    """With a previous sub-model and weight > 0 the reported contrastive term is positive and in the loss."""
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    previous = Representation(frozen_copy(make({**SMALL, "fc": 5}, seed=5)), torch.tensor([0, 2, 4, 6, 8]), GLOBAL_FC)
    current = Representation(model, torch.arange(3, 9), GLOBAL_FC)
    weight = 0.7
    out = train_local(model, tiny_data, TrainSettings(**FAST, contrastive_weight=weight), current, previous)
    assert out["train-contrastive"] > 0.0
    assert math.isfinite(out["train-contrastive"])
    assert out["train-loss"] == pytest.approx(out["train-ce"] + weight * out["train-contrastive"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- evaluate


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(min_value=1, max_value=25), batch=st.integers(1, 8))
def test_evaluate_matches_manual_count(seed, n, batch):
    """evaluate's accuracy is the argmax hit rate and its loss the mean cross-entropy, for any batch size."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 4)
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 3, generator=gen))
        model.bias.copy_(torch.randn(4, generator=gen))
    x = torch.randn(n, 3, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    out = evaluate(model, TensorDataset(x, y), batch_size=batch)
    hits, losses = 0, []
    for xi, yi in zip(x.tolist(), y.tolist()):
        logits = [
            sum(w * v for w, v in zip(row, xi)) + b
            for row, b in zip(model.weight.tolist(), model.bias.tolist())
        ]
        ranked = sorted(logits)
        assume(ranked[-1] - ranked[-2] > 1e-4)  # no near-ties between float paths
        hits += int(max(range(4), key=lambda c: logits[c]) == yi)
        top = max(logits)
        losses.append(top + math.log(sum(math.exp(v - top) for v in logits)) - logits[yi])
    assert 0.0 <= out["accuracy"] <= 1.0
    assert out["accuracy"] == hits / n
    assert out["loss"] == pytest.approx(sum(losses) / n, rel=1e-5, abs=1e-5)


def test_evaluate_perfect_and_wrong_models():
    """A model that always predicts the label scores 1; one that never does scores 0."""
    x = torch.eye(3).repeat(2, 1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    right = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        right.weight.copy_(torch.eye(3))
    assert evaluate(right, TensorDataset(x, y), batch_size=4)["accuracy"] == 1.0
    wrong = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        wrong.weight.copy_(torch.eye(3).roll(1, dims=0))
    assert evaluate(wrong, TensorDataset(x, y), batch_size=4)["accuracy"] == 0.0
