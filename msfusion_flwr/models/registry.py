"""The models a run config names (``model``), and how a model is built from its settings.

``MODELS`` are the models with hand-written width groups; ``torchvision:<name>``
names any torchvision classifier, its groups derived from its graph (:mod:`.derived`).

Every registered class takes ``widths`` (group name -> units; full width when
None), ``rate`` (the participant's width ratio, for its Scalers),
``classifier_scaling`` (HeteroFL's Scaler also on the classifier's input) and
the constructor arguments the data fixes
(:func:`msfusion_flwr.data.model_kwargs`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from torch import nn

from .derived import is_derived_name, named_derived_class
from .language import GPT2LM, TransformerLM
from .vision import FashionCNN, PreResNet18

MODELS: dict[str, type[nn.Module]] = {
    "cnn": FashionCNN,
    "preresnet18": PreResNet18,
    "transformer": TransformerLM,
    "gpt2": GPT2LM,
}


OUTPUT_SCALINGS = ("calibrated", "scaler", "none")
"""How the full model's outputs are kept on the scale its slices trained at (``output-scaling``):

* ``calibrated``: by rule, in the splitting engine: a slice's output-layer weights
  are the global ones divided by the fraction w/K of their inputs it holds, and
  fusion multiplies them back (:meth:`~msfusion_flwr.engine.groups.SplitSpec.calibration`);
  slices train their output layer as a plain narrow model does;
* ``scaler``: HeteroFL's Scaler also on the classifier's input (divides it by r in
  training): calibrated too, but a slice's logits and its head's effective
  learning rate grow by 1/r and 1/r^2, and at r <= 1/8 slices stop learning;
* ``none``: neither: slices train well, but the full model's logits come out about 1/r too large.
"""


@dataclass(frozen=True)
class ModelSettings:
    """The model a run trains (``model``) and how its outputs are scaled (``output-scaling``)."""

    name: str = "cnn"
    output_scaling: str = "calibrated"

    @property
    def classifier_scaler(self) -> bool:
        """Whether the model itself scales its classifier's input (HeteroFL's Scaler)."""
        return self.output_scaling == "scaler"

    @property
    def calibrated(self) -> bool:
        """Whether the splitting engine calibrates output layers by rule when slicing and fusing."""
        return self.output_scaling == "calibrated"


def model_class(name: str) -> type[nn.Module]:
    """The model class registered as ``name``, or derived for ``torchvision:<name>`` / ``hf:<...>`` (:mod:`.derived`)."""
    if name in MODELS:
        return MODELS[name]
    if is_derived_name(name):
        return named_derived_class(name)
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)} or 'torchvision:<name>' or 'hf:<type or config>'")


def build_model(
    name: str,
    widths: Mapping[str, int] | None = None,
    rate: float = 1.0,
    **kwargs: int,
) -> nn.Module:
    """Instantiate model ``name`` at ``widths`` (full width when None)."""
    return model_class(name)(widths=widths, rate=rate, **kwargs)


def model_factory(settings: ModelSettings, **data_kwargs: int) -> Callable[..., nn.Module]:
    """``make_model(widths, rate)``: the run's model at any width, as every participant builds it.

    The FedDF server rebuilds the participants' models with it, so its teachers
    run exactly as the participants trained them (their classifier Scaler included).
    """
    return partial(build_model, settings.name, classifier_scaling=settings.classifier_scaler, **data_kwargs)
