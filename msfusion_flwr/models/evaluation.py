"""How a model is scored: cross-entropy per target, and the global model's evaluation.

Targets are classes (one per image) or next tokens (one per sequence position).
The server evaluates the global model with :func:`evaluate`; participants train
on :func:`token_cross_entropy`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

EVAL_BATCH_SIZE = 1000
"""Default batch size of server-side evaluation; models may set ``eval_batch_size``."""


def token_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of (..., C) logits against (...) targets: one class per image or per token."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, batch_size: int | None = None, device: torch.device | None = None
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``dataset``, per target.

    Targets are classes (one per image) or next tokens (one per sequence
    position); for token targets the result adds ``perplexity = exp(loss)``,
    the exponential of the mean token negative log-likelihood. The batch size
    defaults to the model's ``eval_batch_size``. With ``device``, the model is
    evaluated there and moved back to where it was.
    """
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = device or home
    model.to(device).eval()
    try:
        return _evaluate(model, dataset, batch_size or getattr(model, "eval_batch_size", EVAL_BATCH_SIZE), device)
    finally:
        model.to(home)


def _evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> dict[str, float]:
    loss_sum, correct, count, tokens = 0.0, 0, 0, False
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += token_cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
        count += y.numel()
        tokens = y.dim() > 1
    metrics = {"loss": loss_sum / count, "accuracy": correct / count}
    if tokens:
        metrics["perplexity"] = math.exp(metrics["loss"])
    return metrics
