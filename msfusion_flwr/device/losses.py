"""MSfusion's contrastive loss, on representations placed in the global feature space, and codistillation.

    l_con = -log( exp(cos(z, z_g)/tau) / (exp(cos(z, z_g)/tau) + exp(cos(z, z_p)/tau)) )

``z``: representation of the sub-model being trained; ``z_g``: the same input
through a frozen copy of the sub-model as received this round; ``z_p``: through
the participant's own sub-model as it left its previous round. Sub-models of
different rounds hold different units, so every representation is placed in the
global feature space (zeros at units the sub-model does not hold) before the
cosine is taken.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.groups import Axis, WidthGroup, dim_positions


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

    def to(self, device: torch.device) -> Representation:
        """This representation with its model (moved in place) and its index on ``device``."""
        return Representation(self.model.to(device), self.feature_index.to(device), self.width)


def representation(model: nn.Module, plan: Mapping[str, Tensor], widths: Mapping[str, int]) -> Representation:
    """``model``'s features placed in the global feature space (the full model's representation channels)."""
    claims = feature_claims(model, widths)
    return Representation(model, dim_positions(claims, plan), sum(g.width * a.unit for g, a in claims))


def feature_claims(model: nn.Module, widths: Mapping[str, int]) -> list[tuple[WidthGroup, Axis]]:
    """The groups (at ``widths``) whose units index ``model``'s representation, in order along it: the model's
    own ``feature_claims`` (a derived model whose head reads a concatenation), else its feature group with
    ``feature_unit`` channels per unit (e.g. GPT-2's residual width counts heads)."""
    if hasattr(model, "feature_claims"):
        return model.feature_claims(widths)  # type: ignore[no-any-return,operator]
    group, unit = model.feature_group, model.feature_unit  # type: ignore[attr-defined]
    return [(WidthGroup(group, widths[group], ()), Axis("features", 1, unit))]


def embed_features(z: Tensor, feature_index: Tensor, width: int) -> Tensor:
    """Place sub-model features (B, w) at their global units of a (B, width) tensor."""
    if z.shape[1] == width and torch.equal(feature_index, torch.arange(width, device=feature_index.device)):
        return z
    full = z.new_zeros(z.shape[0], width)
    return full.index_copy(1, feature_index, z)


def contrastive_loss(z: Tensor, z_global: Tensor, z_prev: Tensor, temperature: float) -> Tensor:
    """Model-contrastive loss, mean over the batch (see module docstring)."""
    positive = F.cosine_similarity(z, z_global, dim=1) / temperature
    negative = F.cosine_similarity(z, z_prev, dim=1) / temperature
    logits = torch.stack([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


def codistillation_loss(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``, mean over examples (over tokens for an LM's (B, L, V) logits).

    Codistillation (Anil et al., 2018): a model learns from a stale copy of a
    peer's predictions on its own batch. Here the peer is the participant's
    previous sub-model; the ``T^2`` factor keeps the gradient's scale
    independent of ``T`` (Hinton et al., 2015).
    """
    classes = logits.shape[-1]
    student = F.log_softmax(logits.reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2
