"""Layers shared by the models."""

from __future__ import annotations

from torch import Tensor, nn


class Scaler(nn.Module):
    """Divide activations by the sub-model's width ratio while training (HeteroFL).

    A width-``r`` slice sums over ``r`` times fewer inputs than the full model;
    scaling by ``1/r`` in training keeps the next layer's pre-activations at
    the scale the full model sees at evaluation, where the scaler is identity.
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        return x / self.rate if self.training else x

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
