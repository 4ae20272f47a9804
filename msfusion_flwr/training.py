"""Local training with MSfusion's contrastive loss, and evaluation.

Local objective: ``CE + mu * l_con`` with

    l_con = -log( exp(cos(z, z_g)/tau) / (exp(cos(z, z_g)/tau) + exp(cos(z, z_p)/tau)) )

``z``: representation of the sub-model being trained; ``z_g``: the same input
through a frozen copy of the sub-model as received this round; ``z_p``: through
the participant's own sub-model as it left its previous round. Sub-models of
different rounds hold different units, so every representation is placed in the
global feature space (zeros at units the sub-model does not hold) before the
cosine is taken. With no previous sub-model, ``l_con = 0``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

EVAL_BATCH_SIZE = 1000
"""Batch size of server-side evaluation (BatchNorm uses batch statistics)."""


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation hyper-parameters."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    contrastive_weight: float = 1.0
    contrastive_temperature: float = 0.5
    seed: int = 0


@dataclass
class Representation:
    """A model whose ``features`` live at ``feature_index`` of a ``width``-unit space."""

    model: nn.Module
    feature_index: Tensor
    width: int

    def __call__(self, x: Tensor) -> Tensor:
        """Features of ``x`` scattered into the global feature space."""
        z = self.model.features(x)  # type: ignore[operator]
        return embed_features(z, self.feature_index, self.width)


def embed_features(z: Tensor, feature_index: Tensor, width: int) -> Tensor:
    """Place sub-model features (B, w) at their global units of a (B, width) tensor."""
    if z.shape[1] == width and torch.equal(feature_index, torch.arange(width)):
        return z
    full = z.new_zeros(z.shape[0], width)
    return full.index_copy(1, feature_index, z)


def contrastive_loss(z: Tensor, z_global: Tensor, z_prev: Tensor, temperature: float) -> Tensor:
    """Model-contrastive loss, mean over the batch (see module docstring)."""
    positive = F.cosine_similarity(z, z_global, dim=1) / temperature
    negative = F.cosine_similarity(z, z_prev, dim=1) / temperature
    logits = torch.stack([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long))


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that takes no gradients."""
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _batches(loader: DataLoader, epochs: int) -> Iterator[tuple[Tensor, Tensor]]:
    for _ in range(epochs):
        for x, y in loader:
            if len(y) > 1:  # BatchNorm on batch statistics needs two examples
                yield x, y


def train_local(
    model: nn.Module,
    dataset: Dataset,
    settings: TrainSettings,
    current: Representation,
    previous: Representation | None,
) -> dict[str, float]:
    """Train ``model`` in place; returns mean losses, example count and time.

    ``current`` holds the feature placement of ``model``; its frozen copy is
    ``z_g``. ``previous`` (the sub-model of this participant's last round) gives
    ``z_p``; without it, or with ``contrastive_weight == 0``, only CE is used.
    """
    torch.manual_seed(settings.seed)
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    use_contrastive = settings.contrastive_weight > 0 and previous is not None
    received = Representation(frozen_copy(model), current.feature_index, current.width)
    mean_ce = mean_con = 0.0
    steps = 0
    start = time.perf_counter()
    model.train()
    for x, y in _batches(loader, settings.epochs):
        z = model.features(x)  # type: ignore[operator]
        ce = F.cross_entropy(model.classify(z), y)  # type: ignore[operator]
        loss = ce
        if use_contrastive:
            with torch.no_grad():
                z_global, z_prev = received(x), previous(x)  # type: ignore[misc]
            z_embedded = embed_features(z, current.feature_index, current.width)
            con = contrastive_loss(z_embedded, z_global, z_prev, settings.contrastive_temperature)
            loss = ce + settings.contrastive_weight * con
            mean_con += con.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mean_ce += ce.item()
        steps += 1
    steps_or_one = max(steps, 1)
    return {
        "num-examples": float(len(dataset)),  # type: ignore[arg-type]
        "train-loss": (mean_ce + settings.contrastive_weight * mean_con) / steps_or_one,
        "train-ce": mean_ce / steps_or_one,
        "train-contrastive": mean_con / steps_or_one,
        "train-steps": float(steps),
        "train-time-s": time.perf_counter() - start,
    }


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``dataset``."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    return {"loss": loss_sum / count, "accuracy": correct / count}
