"""The models a run config names (``model``), and how a model is built from its settings.

Every registered class takes ``widths`` (group name -> units; full width when
None), ``rate`` (the participant's width ratio, for its Scalers),
``classifier_scaling`` and the constructor arguments the data fixes
(:func:`msfusion_flwr.data.model_kwargs`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from torch import nn

from .language import GPT2LM, TransformerLM
from .vision import FashionCNN, PreResNet18

MODELS: dict[str, type[nn.Module]] = {
    "cnn": FashionCNN,
    "preresnet18": PreResNet18,
    "transformer": TransformerLM,
    "gpt2": GPT2LM,
}


@dataclass(frozen=True)
class ModelSettings:
    """The model a run trains (``model``) and whether its classifier's input is scaled (``classifier-scaler``)."""

    name: str = "cnn"
    classifier_scaler: bool = True


def model_class(name: str) -> type[nn.Module]:
    """The model class registered as ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


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
    run exactly as the participants trained them (``classifier-scaler`` included).
    """
    return partial(build_model, settings.name, classifier_scaling=settings.classifier_scaler, **data_kwargs)
