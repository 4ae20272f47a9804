"""The optimizer a model trains with: SGD with momentum or Adam, fresh every time (participants, the server's references)."""

from __future__ import annotations

import torch
from torch import nn


def make_optimizer(model: nn.Module, name: str, learning_rate: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adam``: Adam; anything else: SGD with ``momentum``; both with ``weight_decay``."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    return torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
