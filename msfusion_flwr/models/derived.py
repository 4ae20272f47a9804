"""Any PyTorch classifier as a splittable model, its width groups derived from its graph.

A run config names one with ``model = "torchvision:<name>"`` (a torchvision
classification model, e.g. ``torchvision:resnet18``, built without weights) or
``model = "hf:<type or config>"`` (a ``transformers`` image classifier built
from its config: a model type such as ``hf:resnet`` or ``hf:vit``, or a local
config folder; no download);
Python code wraps its own ``nn.Module`` with :func:`derived_model_class`. The
class it returns speaks the protocol every model of the engine speaks
(``widths``/``rate`` in the constructor, ``FULL_WIDTHS``, ``outputs``,
``features``, ``feature_group``, the width groups), so every method runs on it:

* width groups come from :func:`~msfusion_flwr.engine.derivation.derive_groups`,
  traced once per class on the meta device;
* a narrow instance is built without the full model ever existing: the
  architecture is constructed with its parameters on the meta device (only its
  buffers, O(channels), are real), cut to the widths with
  :func:`~msfusion_flwr.engine.derivation.narrow_to`, then its parameters are
  allocated at the narrow shapes and initialised by each layer's
  ``reset_parameters`` (a participant loads the received tensors over them);
* the full-width instance is the architecture as its constructor builds it;
* the representation (MSfusion's contrastive term) is the input of the output
  layer (the layer that reads split features and writes the unsplit outputs);
* BatchNorm layers use batch statistics (HeteroFL's static BN, as the
  hand-declared models do), unless the architecture says otherwise.

Such models have no HeteroFL Scaler: ``output-scaling`` is ``calibrated`` or ``none``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..engine.groups import Axis, SplitSpec, WidthGroup

TORCHVISION_PREFIX = "torchvision:"
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Architecture:
    """How to build a user's classifier and trace it.

    ``build(num_classes)`` returns the full-width ``nn.Module``; ``in_channels``
    and ``example_size`` (height, width) shape the example input tracing uses;
    ``units`` are :func:`~msfusion_flwr.engine.derivation.derive_groups`'s hints.
    ``example`` overrides the example input (``device -> input``, e.g. token ids
    for a ``transformers`` encoder) and ``output_transform`` picks the logits
    from what the network returns (``lambda out: out.logits``).
    With ``static_batch_norm`` (the default) every BatchNorm normalises with the
    batch's statistics, in training and evaluation (HeteroFL's static BN): running
    statistics gathered by a slice do not fit the full model, whose hidden sums
    run over 1/r times more channels.
    """

    name: str
    build: Callable[[int], nn.Module]
    in_channels: int = 3
    example_size: tuple[int, int] = (32, 32)
    units: Mapping[str, int] = field(default_factory=dict)
    static_batch_norm: bool = True
    example: Callable[[str | torch.device], Any] | None = None
    output_transform: Callable[[Any], Tensor] | None = None
    input_kind: str = "image"

    def example_input(self, device: str | torch.device = "meta") -> Any:
        if self.example is not None:
            return self.example(device)
        return torch.zeros(2, self.in_channels, *self.example_size, device=device)

    def logits(self, output: Any) -> Tensor:
        return self.output_transform(output) if self.output_transform else output

    def network(self, num_classes: int) -> nn.Module:
        """The architecture as the engine splits it (static BN applied)."""
        net = self.build(num_classes)
        return static_batch_norm(net) if self.static_batch_norm else net


def static_batch_norm(model: nn.Module) -> nn.Module:
    """Every BatchNorm of ``model`` normalises with batch statistics and keeps none (in place)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    return model


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device (buffers stay real).

    Each parameter exists for a moment at its constructed size before it moves,
    so the peak is one tensor, never the model; initialisers then run on meta, for free.
    It patches ``nn.Module.register_parameter`` while it lasts: modules other threads
    build meanwhile would land on meta too (a participant builds its model alone).
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def materialize(model: nn.Module) -> nn.Module:
    """Allocate ``model``'s meta parameters on the CPU at their shapes and initialise every layer that can
    (``reset_parameters``); parameters no layer resets (a class token, a layer scale) start at zero."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                module._parameters[name] = nn.Parameter(torch.zeros(param.shape, dtype=param.dtype), param.requires_grad)
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return model


class DerivedClassifier(nn.Module):
    """A classifier whose width groups were derived (subclassed per architecture by :func:`derived_model_class`)."""

    architecture: ClassVar[Architecture]
    GROUPS: ClassVar[tuple[WidthGroup, ...]]
    FULL_WIDTHS: ClassVar[dict[str, int]]
    feature_group: ClassVar[str]
    feature_unit: ClassVar[int]
    head_module: ClassVar[str]
    input_kind = "image"
    eval_batch_size = 500

    def __init__(
        self,
        widths: Mapping[str, int] | None = None,
        rate: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 3,
        classifier_scaling: bool = False,
    ) -> None:
        super().__init__()
        if classifier_scaling:
            raise ValueError(f"model {self.architecture.name!r} has no HeteroFL Scaler; use output-scaling 'calibrated' or 'none'")
        if in_channels not in (1, self.architecture.in_channels):
            raise ValueError(f"model {self.architecture.name!r} reads {self.architecture.in_channels} input channels, the data has {in_channels}")
        self.repeat_channels = self.architecture.in_channels if in_channels == 1 else 1
        widths = {**self.FULL_WIDTHS, **(widths or {})}
        self.widths = widths
        if widths == self.FULL_WIDTHS:
            self.net = self.architecture.network(num_classes)
        else:
            from ..engine.derivation import narrow_to

            with parameters_on_meta():
                net = self.architecture.network(num_classes)
            self.net = materialize(narrow_to(net, self.GROUPS, widths))
        self._features: list[Tensor] = []
        self.net.get_submodule(self.head_module).register_forward_pre_hook(self._keep_features)

    def _keep_features(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._features.append(args[0].flatten(1))

    @classmethod
    def feature_claims(cls, widths: Mapping[str, int]) -> list[tuple[WidthGroup, Axis]]:
        """The groups (at ``widths``) the output layer reads, in order along its inputs (several where it
        reads a concatenation): they index the representation."""
        weight = f"{cls.head_module}.weight"
        claims = [(g, a) for g in cls.GROUPS for a in g.axes if a.tensor == weight and a.consumes]
        return [(WidthGroup(g.name, widths[g.name], g.axes), a) for g, a in sorted(claims, key=lambda c: c[1].part)]

    def width_groups(self) -> list[WidthGroup]:
        """The derived groups at this instance's widths and tensor names (under ``net.``)."""
        return [_prefixed(group, "net.", self.widths[group.name]) for group in self.GROUPS]

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the output layer's input (the representation), from one pass."""
        if self.repeat_channels > 1:  # grayscale images for an RGB architecture
            x = x.expand(-1, self.repeat_channels, -1, -1)
        self._features.clear()
        logits = self.architecture.logits(self.net(x))
        return logits, self._features.pop()

    def features(self, x: Tensor) -> Tensor:
        return self.outputs(x)[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.outputs(x)[0]


TRACE_WIDTH = 2
"""Units per group of the copy :func:`traced_width_groups` traces: the groups' structure does not depend on
their widths, and 2 units (not 1) tell a unit's span from stacked copies along an axis."""


def traced_width_groups(
    model: nn.Module, example_shape: tuple[int, ...], example_dtype: torch.dtype = torch.float32, **arguments: Any
) -> list[WidthGroup]:
    """The width groups of a model that names them instead of declaring them.

    Derived from the graph of a copy of ``type(model)`` built with
    ``arguments`` and :data:`TRACE_WIDTH` units in every group, traced on a zero
    input of ``example_shape`` and ``example_dtype`` (token ids: ``torch.long``)
    on the CPU (once per class, arguments and shape: the copy is a few
    kilobytes, and the CPU spares the second of lazy imports a first forward
    pass on the meta device costs a fresh device process), with the class's
    hints ``UNIT_HINTS`` and ``STACKED_HINTS`` where it has them
    (:func:`~msfusion_flwr.engine.derivation.derive_groups`' ``units`` and
    ``stacked``), then renamed by the class's ``GROUP_NAMES`` (the group's first
    producing layer -> its name, in the order the groups are planned) and sized
    at ``model.widths``.
    """
    groups = _traced_named_groups(type(model), tuple(example_shape), example_dtype, tuple(sorted(arguments.items())))
    return [replace(group, width=model.widths[group.name]) for group in groups]


@functools.cache
def _traced_named_groups(
    model_class: type[nn.Module],
    example_shape: tuple[int, ...],
    example_dtype: torch.dtype,
    arguments: tuple[tuple[str, Any], ...],
) -> tuple[WidthGroup, ...]:
    from ..engine.derivation import DerivationError, derive_groups

    full_widths: Mapping[str, int] = model_class.FULL_WIDTHS  # type: ignore[attr-defined]
    traced = model_class(widths={group: TRACE_WIDTH for group in full_widths}, **dict(arguments))
    example = torch.zeros(example_shape, dtype=example_dtype)
    units, stacked = getattr(model_class, "UNIT_HINTS", {}), getattr(model_class, "STACKED_HINTS", {})
    derived = {group.name: group for group in derive_groups(traced, example, units=units, stacked=stacked)}
    names: Mapping[str, str] = model_class.GROUP_NAMES  # type: ignore[attr-defined]
    if set(derived) != set(names):
        raise DerivationError(
            f"{model_class.__name__}: derivation found groups started by {sorted(derived)}, GROUP_NAMES names {sorted(names)}"
        )
    return tuple(replace(derived[layer], name=name) for layer, name in names.items())


def _prefixed(group: WidthGroup, prefix: str, width: int) -> WidthGroup:
    return WidthGroup(group.name, width, tuple(replace(a, tensor=prefix + a.tensor) for a in group.axes))


def derived_model_class(architecture: Architecture) -> type[DerivedClassifier]:
    """A model class for ``architecture``: its groups derived on the meta device, its head and
    representation found from them (the one layer that reads split features and writes unsplit outputs)."""
    from ..engine.derivation import DerivationError, derive_groups

    with torch.device("meta"):
        traced = architecture.network(10)
    groups = derive_groups(traced, architecture.example_input(), architecture.output_transform, architecture.units)
    if not groups:
        raise DerivationError(f"model {architecture.name!r}: derivation found no width group to split")
    spec = SplitSpec(groups, {k: v.shape for k, v in traced.state_dict().items()})
    heads = sorted({tensor.rpartition(".")[0] for tensor in spec.output_layers})
    if len(heads) != 1:
        raise DerivationError(f"model {architecture.name!r}: expected one output layer reading split features, found {heads or 'none'}")
    head_claims = [(a, g) for g in groups for a in g.axes if a.consumes and a.tensor == f"{heads[0]}.weight"]
    stacked = [g.name for a, g in head_claims if a.blocks != 1]
    if stacked or not head_claims:
        raise DerivationError(f"model {architecture.name!r}: the output layer {heads[0]!r} reads no group or stacked copies of {stacked}")
    axis, group = min(head_claims, key=lambda claim: claim[0].part)
    attributes = {
        "architecture": architecture,
        "GROUPS": tuple(groups),
        "FULL_WIDTHS": {g.name: g.width for g in groups},
        "feature_group": group.name,
        "feature_unit": axis.unit,
        "head_module": heads[0],
        "input_kind": architecture.input_kind,
        "__doc__": f"{architecture.name}, its width groups derived from its graph.",
    }
    return type(f"Derived[{architecture.name}]", (DerivedClassifier,), attributes)


def torchvision_architecture(name: str) -> Architecture:
    """torchvision's classification model ``name``, built without pretrained weights."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"torchvision has no classification model {name!r}; choose one of {', '.join(available)}")
    build = functools.partial(_build_torchvision, name)
    return Architecture(f"{TORCHVISION_PREFIX}{name}", build)


def _build_torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


@functools.cache
def named_derived_class(name: str) -> type[DerivedClassifier]:
    """The model class a run config's ``model = "torchvision:<name>"`` or ``"hf:<type or config>"`` names
    (derived once per process)."""
    if name.startswith(TORCHVISION_PREFIX):
        return derived_model_class(torchvision_architecture(name.removeprefix(TORCHVISION_PREFIX)))
    if name.startswith(HF_PREFIX):
        return derived_model_class(hf_image_architecture(name.removeprefix(HF_PREFIX)))
    raise ValueError(f"unknown model {name!r}")


def is_derived_name(name: str) -> bool:
    """Whether ``name`` names a model by a prefix (``torchvision:``, ``hf:``) rather than the registry."""
    return name.startswith((TORCHVISION_PREFIX, HF_PREFIX))



def transformers_architecture(config: Any, example_length: int = 8) -> Architecture:
    """A ``transformers`` sequence classifier built from ``config`` (no download), attention heads as units.

    The head hint comes from the config (``hidden_size / num_attention_heads``
    channels per head) for every module that holds ``attention_head_size``:
    BERT-style self-attention reshapes its projections into heads of that size.
    """
    import transformers

    def build(num_classes: int) -> nn.Module:
        config.num_labels = num_classes
        return transformers.AutoModelForSequenceClassification.from_config(config)

    def example(device: str | torch.device) -> dict[str, Tensor]:
        return {"input_ids": torch.zeros(2, example_length, dtype=torch.long, device=device)}

    return Architecture(
        f"transformers:{config.model_type}", build, units=attention_head_hints(build), example=example,
        output_transform=_logits, input_kind="text",
    )  # fmt: skip


def _logits(output: Any) -> Tensor:
    return output.logits


def attention_head_hints(build: Callable[[int], nn.Module]) -> dict[str, int]:
    """Unit hints for ``transformers`` self-attention: a module holding its head size (``attention_head_size``
    or ``head_dim``) and a query projection (``query`` or ``q_proj``) reshapes its projections into heads of
    that size, so heads are the units."""
    with torch.device("meta"):
        probe = build(2)
    hints = {}
    for name, module in probe.named_modules():
        size = getattr(module, "attention_head_size", getattr(module, "head_dim", None))
        query = next((q for q in ("query", "q_proj") if isinstance(getattr(module, q, None), nn.Linear)), None)
        if isinstance(size, int) and query is not None:
            hints[f"{name}.{query}"] = size
    return hints


def hf_image_architecture(spec: str) -> Architecture:
    """A ``transformers`` image classifier from a config, without weights: ``spec`` is a model type
    (``resnet``, ``vit``, ...: the type's default config) or a local folder / ``config.json``."""
    import transformers

    try:
        path = Path(spec).expanduser()
        if path.exists():
            config = transformers.AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
        else:
            config = transformers.AutoConfig.for_model(spec)
    except (ValueError, OSError) as error:
        raise ValueError(f"'{HF_PREFIX}{spec}' is neither a transformers model type nor a local config ({' '.join(str(error).split())[:200]})") from None
    if type(config) not in transformers.AutoModelForImageClassification._model_mapping:
        raise ValueError(f"transformers model type {config.model_type!r} has no image-classification model")

    def build(num_classes: int) -> nn.Module:
        config.num_labels = num_classes
        return transformers.AutoModelForImageClassification.from_config(config)

    size = getattr(config, "image_size", 32)
    size = size if isinstance(size, int) else int(size[0])
    return Architecture(
        f"{HF_PREFIX}{spec}", build, in_channels=getattr(config, "num_channels", 3), example_size=(size, size),
        units=attention_head_hints(build), output_transform=_logits,
    )  # fmt: skip
