"""The Scaler on the classifier's input (``classifier-scaler``): what it does to a slice's logits and learning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msfusion_flwr.models import FashionCNN, build_model

WIDTH_RATIO = 1 / 16

MODELS = {
    "cnn": {"widths": {"conv1": 4, "conv2": 8, "conv3": 16, "fc": 32}, "kwargs": {}, "input": lambda: torch.randn(8, 1, 28, 28)},
    "preresnet18": {"widths": None, "kwargs": {"num_classes": 10}, "input": lambda: torch.randn(4, 3, 32, 32)},
    "transformer": {"widths": None, "kwargs": {"vocab_size": 50}, "input": lambda: torch.randint(0, 50, (2, 16))},
    "gpt2": {"widths": None, "kwargs": {"vocab_size": 50}, "input": lambda: torch.randint(0, 50, (2, 16))},
}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.outputs(x)[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_classifier_scaler_divides_the_slice_logits_by_r_in_training_only(name):
    """Same weights, head bias zeroed: logits with the scaler = logits without / r in training, equal in evaluation."""
    case = MODELS[name]
    torch.manual_seed(0)
    scaled = build_model(name, case["widths"], WIDTH_RATIO, classifier_scaling=True, **case["kwargs"])
    plain = build_model(name, case["widths"], WIDTH_RATIO, classifier_scaling=False, **case["kwargs"])
    for module in scaled.modules():
        if isinstance(module, nn.Linear) and module.out_features in (10, 50) and module.bias is not None:
            nn.init.zeros_(module.bias)
    plain.load_state_dict(scaled.state_dict())
    x = case["input"]()
    with torch.no_grad():
        scaled.train(), plain.train()
        torch.testing.assert_close(_logits(scaled, x), _logits(plain, x) / WIDTH_RATIO, rtol=1e-4, atol=1e-4)
        scaled.eval(), plain.eval()
        torch.testing.assert_close(_logits(scaled, x), _logits(plain, x))


def _separable_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes, each a fixed random 28x28 pattern plus noise: learnable by any working CNN in a few steps."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, 10, (n,), generator=g)
    return patterns[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=g), y


def _train_loss(classifier_scaling: bool) -> float:
    """Mean cross-entropy of the last 10 of 100 SGD steps of a 1/16-width FashionCNN slice (the run's optimiser)."""
    torch.manual_seed(0)
    model = FashionCNN({g: round(w * WIDTH_RATIO) for g, w in FashionCNN.FULL_WIDTHS.items()}, WIDTH_RATIO,
                       classifier_scaling=classifier_scaling)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = _separable_images(3200, seed=1)
    losses = []
    for i in range(0, len(y), 32):
        loss = nn.functional.cross_entropy(model.outputs(x[i : i + 32])[0], y[i : i + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


def test_a_sixteenth_width_slice_learns_without_the_classifier_scaler():
    """At r = 1/16 the slice learns an easy task without the classifier-input Scaler, and does worse with it.

    Why the option exists: with it, the slice's logits are 16x and its head's
    effective learning rate 256x those of the same narrow model without it.
    """
    plain = _train_loss(classifier_scaling=False)
    assert plain < 0.5
    assert _train_loss(classifier_scaling=True) > 2 * plain
