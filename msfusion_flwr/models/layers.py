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


def classifier_scaler(rate: float, enabled: bool) -> Scaler:
    """The Scaler on the classifier's input: ``rate`` when enabled, else identity (rate 1).

    It keeps the full model's logits at the scale a slice trained them at, but
    it also multiplies the slice's logits and the head's effective learning rate
    by 1/r and 1/r²; at r = 1/16 a slice then no longer learns at all (README,
    Results). It is on with ``output-scaling = "scaler"`` only; the hidden layers'
    Scalers stay.
    """
    return Scaler(rate if enabled else 1.0)
