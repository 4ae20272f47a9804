"""Local training of a participant's sub-model: ``CE + mu * l_con + beta * l_kd``, one fresh optimizer per round.

CE is over classes for images and over the next token at every position for
language models (:func:`~msfusion_flwr.models.evaluation.token_cross_entropy`);
``l_con`` is MSfusion's contrastive loss and ``l_kd`` codistillation toward the
previous sub-model's predictions (:mod:`.losses`), each used when the
participant kept its previous round's sub-model and its weight
(``contrastive-weight``, ``codistill-weight``) is positive.
The first steps are measured (:mod:`.metering`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..config import TrainSettings
from ..models.evaluation import token_cross_entropy
from ..models.optimizers import make_optimizer
from .losses import Representation, codistillation_loss, contrastive_loss, embed_features
from .metering import ResourceMeter, resident_tensors


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that takes no gradients."""
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _batches(loader: DataLoader, epochs: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    for _ in range(epochs):
        for x, y in loader:
            if len(y) > 1:  # BatchNorm on batch statistics needs two examples
                yield x.to(device), y.to(device)


def train_local(
    model: nn.Module,
    dataset: Dataset,
    settings: TrainSettings,
    current: Representation,
    previous: Representation | None,
) -> dict[str, float]:
    """Train ``model`` in place, on the device its parameters are on; returns mean losses, example count,
    cost and time.

    ``current`` holds the feature placement of ``model``; its frozen copy is
    ``z_g``. ``previous`` (the sub-model of this participant's last round, on
    the same device) gives ``z_p`` and, under codistillation, the teacher's
    logits; without it, or with both weights 0, only CE is used.
    """
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    optimizer = make_optimizer(model, settings.optimizer, settings.learning_rate, settings.momentum, settings.weight_decay)
    use_contrastive = settings.contrastive_weight > 0 and previous is not None
    use_codistill = settings.codistill_weight > 0 and previous is not None
    received = Representation(frozen_copy(model), current.feature_index, current.width)
    models = [model, received.model] + ([previous.model] if use_contrastive or use_codistill else [])  # type: ignore[union-attr]
    meter = ResourceMeter()
    totals = {"ce": 0.0, "con": 0.0, "kd": 0.0}

    def step(x: Tensor, y: Tensor) -> None:
        logits, z = model.outputs(x)  # type: ignore[operator]
        ce = token_cross_entropy(logits, y)
        loss = ce
        if use_codistill:
            with torch.no_grad():
                teacher_logits, z_teacher = previous.model.outputs(x)  # type: ignore[union-attr,operator]
            kd = codistillation_loss(logits, teacher_logits, settings.codistill_temperature)
            loss = loss + settings.codistill_weight * kd
            totals["kd"] += kd.item()
        del logits  # backward needs the log-softmax, not the logits: free them before the backward pass
        if use_contrastive:
            with torch.no_grad():
                z_global = received(x)
                z_prev = (
                    embed_features(z_teacher, previous.feature_index, previous.width)  # type: ignore[union-attr]
                    if use_codistill
                    else previous(x)  # type: ignore[misc]
                )
            z_embedded = embed_features(z, current.feature_index, current.width)
            con = contrastive_loss(z_embedded, z_global, z_prev, settings.contrastive_temperature)
            loss = loss + settings.contrastive_weight * con
            totals["con"] += con.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["ce"] += ce.item()

    steps = examples = 0
    start = time.perf_counter()
    model.train()
    for x, y in _batches(loader, settings.epochs, device):
        if steps == 0:
            resident = resident_tensors(models, optimizer, (x, y))
            meter.count_flops(lambda: meter.track_memory(lambda: step(x, y), resident), len(y))
        elif steps == 1:
            meter.track_memory(lambda: step(x, y), resident_tensors(models, optimizer, (x, y)))
        else:
            step(x, y)
        steps += 1
        examples += len(y)
    steps_or_one = max(steps, 1)
    return {
        "num-examples": float(len(dataset)),  # type: ignore[arg-type]
        "train-loss": (totals["ce"] + settings.contrastive_weight * totals["con"] + settings.codistill_weight * totals["kd"])
        / steps_or_one,
        "train-ce": totals["ce"] / steps_or_one,
        "train-contrastive": totals["con"] / steps_or_one,
        "train-codistill": totals["kd"] / steps_or_one,
        "train-steps": float(steps),
        "train-time-s": time.perf_counter() - start,
        "trained-params": float(sum(p.numel() for p in model.parameters())),
        "train-flops": meter.flops_per_example * examples,
        "peak-memory-bytes": float(meter.peak_memory_bytes),
    }
