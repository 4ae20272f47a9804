"""A two-layer classifier whose training FLOPs are known in closed form (accounting and codistillation tests)."""

from __future__ import annotations

import torch
from torch import nn

from msfusion_flwr.models import ImageClassifier


class TwoLayer(ImageClassifier):
    """in -> hidden (features) -> classes, no bias: FLOPs are two matmuls."""

    def __init__(self, d_in: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, hidden, bias=False)
        self.head = nn.Linear(hidden, classes, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)
