"""Local training with MSfusion's contrastive loss, and evaluation.

Local objective: ``CE + mu * l_con`` (CE over classes for images, over the
next token at every position for language models) with

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
import math
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

EVAL_BATCH_SIZE = 1000
"""Default batch size of server-side evaluation; models may set ``eval_batch_size``."""
OPTIMIZERS = ("sgd", "adam")


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
    optimizer: str = "sgd"
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


def token_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of (..., C) logits against (...) targets: one class per image or per token."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """SGD with momentum (``momentum`` key) or Adam, fresh every round, with ``weight_decay``."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=settings.learning_rate, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


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


@dataclass
class ResourceMeter:
    """Measured cost of one participant's local training.

    FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the first
    step (forward, backward and the contrastive term's extra forward passes;
    the counter covers matmul/conv-like operators, not element-wise ones),
    scaled by the number of examples trained on. Peak memory comes from
    :class:`PeakTensorMemory` (parameters, gradients, optimizer state, the
    batch, activations and temporaries, frozen copies included) on the first
    two steps, the second one with optimizer state in place.
    """

    flops_per_example: float = 0.0
    peak_memory_bytes: int = 0

    def count_flops(self, step: Callable[[], None], batch_size: int) -> None:
        with FlopCounterMode(display=False) as counter:
            step()
        self.flops_per_example = counter.get_total_flops() / batch_size

    def track_memory(self, step: Callable[[], None], resident: Iterable[Tensor]) -> None:
        """Peak bytes of tensor storage alive during one step (``resident``: what exists before it)."""
        with PeakTensorMemory(resident) as tracker:
            step()
        self.peak_memory_bytes = max(self.peak_memory_bytes, tracker.peak)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage while the mode is active.

    Starts from the storages of ``resident`` (parameters, gradients, optimizer
    state, the batch) and adds every storage an operator creates, releasing it
    when PyTorch frees it (storages keep their Python object, so a weakref
    finalizer fires on the real free). Views share their base's storage and are
    counted once.
    """

    def __init__(self, resident: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = self.peak = 0
        for tensor in resident:
            self._track(tensor)

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        self._live[key] = storage.nbytes()
        self.current += self._live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self._track(leaf)
        return out


def resident_tensors(models: Iterable[nn.Module], optimizer: torch.optim.Optimizer, batch: Iterable[Tensor]) -> list[Tensor]:
    """Tensors that live across a training step: parameters, gradients, optimizer state, the batch."""
    tensors = list(batch)
    for model in models:
        for p in model.parameters():
            tensors.append(p)
            if p.grad is not None:
                tensors.append(p.grad)
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, Tensor)]
    return tensors


def train_local(
    model: nn.Module,
    dataset: Dataset,
    settings: TrainSettings,
    current: Representation,
    previous: Representation | None,
) -> dict[str, float]:
    """Train ``model`` in place; returns mean losses, example count, cost and time.

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
    optimizer = make_optimizer(model, settings)
    use_contrastive = settings.contrastive_weight > 0 and previous is not None
    received = Representation(frozen_copy(model), current.feature_index, current.width)
    models = [model, received.model] + ([previous.model] if use_contrastive else [])  # type: ignore[union-attr]
    meter = ResourceMeter()
    totals = {"ce": 0.0, "con": 0.0}

    def step(x: Tensor, y: Tensor) -> None:
        logits, z = model.outputs(x)  # type: ignore[operator]
        ce = token_cross_entropy(logits, y)
        del logits  # backward needs the log-softmax, not the logits: free them before the backward pass
        loss = ce
        if use_contrastive:
            with torch.no_grad():
                z_global, z_prev = received(x), previous(x)  # type: ignore[misc]
            z_embedded = embed_features(z, current.feature_index, current.width)
            con = contrastive_loss(z_embedded, z_global, z_prev, settings.contrastive_temperature)
            loss = ce + settings.contrastive_weight * con
            totals["con"] += con.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["ce"] += ce.item()

    steps = examples = 0
    start = time.perf_counter()
    model.train()
    for x, y in _batches(loader, settings.epochs):
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
        "train-loss": (totals["ce"] + settings.contrastive_weight * totals["con"]) / steps_or_one,
        "train-ce": totals["ce"] / steps_or_one,
        "train-contrastive": totals["con"] / steps_or_one,
        "train-steps": float(steps),
        "train-time-s": time.perf_counter() - start,
        "trained-params": float(sum(p.numel() for p in model.parameters())),
        "train-flops": meter.flops_per_example * examples,
        "peak-memory-bytes": float(meter.peak_memory_bytes),
    }


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``dataset``, per target.

    Targets are classes (one per image) or next tokens (one per sequence
    position); for token targets the result adds ``perplexity = exp(loss)``,
    the exponential of the mean token negative log-likelihood. The batch size
    defaults to the model's ``eval_batch_size``.
    """
    model.eval()
    size = batch_size or getattr(model, "eval_batch_size", EVAL_BATCH_SIZE)
    loss_sum, correct, count, tokens = 0.0, 0, 0, False
    for x, y in DataLoader(dataset, batch_size=size):
        logits = model(x)
        loss_sum += token_cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
        count += y.numel()
        tokens = y.dim() > 1
    metrics = {"loss": loss_sum / count, "accuracy": correct / count}
    if tokens:
        metrics["perplexity"] = math.exp(metrics["loss"])
    return metrics
