"""Width groups: what of a model can be split, and where each group's units sit.

A model declares its splittable hidden dimensions as *width groups*. A group of
width K names every tensor axis indexed by that dimension (conv out-channels and
the next layer's in-channels, norm parameters, ...). Models declare groups at
module level as :class:`GroupDecl` (which modules produce and which consume the
group's units), resolved through per-module-type axis rules into
:class:`Axis` lists; :class:`SplitSpec` checks them against the model's state
dict and maps an index plan (the units a participant holds) to positions along
every split tensor axis. Nothing here knows about a particular model; models
without declarations get the same groups traced from their graph
(:mod:`.derivation`).

The rest of the engine: :mod:`.policies` plans which units each participant
holds, :mod:`.slicing` cuts sub-models, :mod:`.fusion` fuses them back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

IndexPlan = dict[str, Tensor]
"""Group name -> 1-D int64 tensor of the group units a participant holds."""


@dataclass(frozen=True)
class Axis:
    """One tensor axis indexed by a width group.

    Group unit ``i`` covers positions ``b * K * unit + i * unit + u`` along the
    axis for every block ``b < blocks`` and offset ``u < unit``: ``unit`` > 1
    covers multi-element units (attention heads of ``head_dim`` rows), ``blocks``
    > 1 covers stacked copies (q, k and v rows in one fused projection).
    ``consumes`` marks an axis along which the tensor's layer *reads* the
    group's units (a Linear's input columns), as opposed to producing them.
    ``part`` orders the groups whose axes are concatenated along one tensor
    dim (a layer reading ``torch.cat`` of several groups' channels): the group
    of part ``p`` starts after the full extent of parts ``< p`` at the spec's
    widths. 0 where a dim belongs to one group.
    """

    tensor: str
    dim: int
    unit: int = 1
    blocks: int = 1
    consumes: bool = False
    part: int = 0


@dataclass(frozen=True)
class WidthGroup:
    """A splittable hidden dimension of width ``width`` and every axis it indexes."""

    name: str
    width: int
    axes: tuple[Axis, ...]


@dataclass(frozen=True)
class GroupDecl:
    """Module-level declaration of a width group.

    ``outputs`` are the modules whose output features are the group's units
    (a Linear's rows, a norm layer's channels), ``inputs`` the modules that
    consume them (the next Linear's columns). ``unit`` and ``blocks`` are as in
    :class:`Axis`; ``blocks_of`` overrides ``blocks`` for single modules, such
    as a fused q/k/v projection (3 blocks) whose heads the out-projection
    consumes unstacked (1 block).
    """

    name: str
    outputs: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    unit: int = 1
    blocks: int = 1
    blocks_of: Mapping[str, int] = field(default_factory=dict)


AxisRule = Callable[[nn.Module], list[tuple[str, int]]]
"""Module -> [(local tensor name, dim)] for one side (output or input) of a module."""


def _present(module: nn.Module, names: Iterable[str]) -> list[str]:
    local = {n for n, _ in module.named_parameters(recurse=False)}
    local |= {n for n, _ in module.named_buffers(recurse=False)}
    return [n for n in names if n in local]


def _conv_or_linear_out(module: nn.Module) -> list[tuple[str, int]]:
    return [(n, 0) for n in _present(module, ("weight", "bias"))]


def _conv_or_linear_in(module: nn.Module) -> list[tuple[str, int]]:
    return [("weight", 1)]


def _norm_out(module: nn.Module) -> list[tuple[str, int]]:
    names = ("weight", "bias", "running_mean", "running_var")
    return [(n, 0) for n in _present(module, names)]


def _embedding_out(module: nn.Module) -> list[tuple[str, int]]:
    return [("weight", 1)]


OUTPUT_RULES: dict[type[nn.Module], AxisRule] = {
    nn.Linear: _conv_or_linear_out,
    nn.Conv1d: _conv_or_linear_out,
    nn.Conv2d: _conv_or_linear_out,
    nn.BatchNorm1d: _norm_out,
    nn.BatchNorm2d: _norm_out,
    nn.LayerNorm: _norm_out,
    nn.Embedding: _embedding_out,
}
"""How each module type's *output* features map to its tensors' axes.

Register rules for third-party module types here (e.g. a transposed Conv1D)."""

INPUT_RULES: dict[type[nn.Module], AxisRule] = {
    nn.Linear: _conv_or_linear_in,
    nn.Conv1d: _conv_or_linear_in,
    nn.Conv2d: _conv_or_linear_in,
}
"""How each module type's *input* features map to its tensors' axes."""


def _rule_for(rules: Mapping[type[nn.Module], AxisRule], module: nn.Module) -> AxisRule:
    for cls in type(module).__mro__:
        if cls in rules:
            return rules[cls]
    raise TypeError(f"no axis rule for module type {type(module).__name__}")


def resolve_groups(model: nn.Module, decls: Sequence[GroupDecl]) -> list[WidthGroup]:
    """Turn module-level declarations into tensor axes, reading K off the model."""
    modules = dict(model.named_modules())
    state = model.state_dict()
    groups = []
    for decl in decls:
        axes: list[Axis] = []
        for side, rules, consumes in ((decl.outputs, OUTPUT_RULES, False), (decl.inputs, INPUT_RULES, True)):
            for mod_name in side:
                module = modules[mod_name]
                blocks = decl.blocks_of.get(mod_name, decl.blocks)
                for local, dim in _rule_for(rules, module)(module):
                    key = f"{mod_name}.{local}" if mod_name else local
                    axes.append(Axis(key, dim, decl.unit, blocks, consumes))
        first = axes[0]
        width = state[first.tensor].shape[first.dim] // (first.unit * first.blocks)
        groups.append(WidthGroup(decl.name, width, tuple(axes)))
    return groups


class SplitSpec:
    """The width groups of one architecture, checked against its state dict."""

    def __init__(self, groups: Sequence[WidthGroup], shapes: Mapping[str, torch.Size]):
        self.groups = {g.name: g for g in groups}
        if len(self.groups) != len(groups):
            raise ValueError("duplicate width-group names")
        self._axes_by_tensor: dict[str, list[tuple[WidthGroup, Axis]]] = {}
        for group in groups:
            for axis in group.axes:
                if axis.tensor not in shapes:
                    raise ValueError(f"group {group.name!r}: no tensor {axis.tensor!r}")
                claims = self._axes_by_tensor.setdefault(axis.tensor, [])
                if any(a.dim == axis.dim and (a.part == axis.part or g is group) for g, a in claims):
                    raise ValueError(f"{axis.tensor} dim {axis.dim} is in two groups")
                claims.append((group, axis))
        for tensor, claims in self._axes_by_tensor.items():
            claims.sort(key=lambda claim: (claim[1].dim, claim[1].part))
            for dim in {axis.dim for _, axis in claims}:
                _check_dim(tensor, dim, [c for c in claims if c[1].dim == dim], shapes[tensor][dim])
        self.shapes = dict(shapes)

    @classmethod
    def from_model(cls, model: nn.Module) -> SplitSpec:
        """Build the spec of a model that declares ``width_group_decls()`` or derived ``width_groups()``."""
        if hasattr(model, "width_groups"):
            groups = model.width_groups()  # type: ignore[operator]
        else:
            groups = resolve_groups(model, model.width_group_decls())  # type: ignore[operator]
        return cls(groups, {k: v.shape for k, v in model.state_dict().items()})

    @property
    def widths(self) -> dict[str, int]:
        """Full width K of every group."""
        return {name: g.width for name, g in self.groups.items()}

    def full_plan(self) -> IndexPlan:
        """The plan that holds every unit (the whole model)."""
        return {name: torch.arange(g.width) for name, g in self.groups.items()}

    @property
    def output_layers(self) -> list[str]:
        """Split tensors whose every split axis is an input: the layers that read split features and
        write the model's unsplit outputs (the classifier, a language model's head)."""
        return [t for t, claims in self._axes_by_tensor.items() if all(axis.consumes for _, axis in claims)]

    def calibration(self, plan: Mapping[str, Tensor]) -> dict[str, float]:
        """For every output layer, the fraction of its inputs that ``plan`` holds (w/K of each input group;
        over concatenated groups, the held share of the dim).

        A slice's output layer sums over that fraction of the full model's
        inputs, so the full model's outputs are on the slices' scale when its
        output-layer weights are the slices' weights times this fraction
        (:func:`~.slicing.slice_state` and :func:`~.fusion.aggregate` with ``calibrate``).
        """
        factors = {}
        for tensor in self.output_layers:
            factor = 1.0
            for claims in _by_dim(self._axes_by_tensor[tensor]):
                if len(claims) == 1:
                    group = claims[0][0]
                    factor *= len(plan[group.name]) / group.width
                else:
                    held = sum(len(plan[g.name]) * a.unit * a.blocks for g, a in claims)
                    factor *= held / sum(_extent(g, a) for g, a in claims)
            factors[tensor] = factor
        return factors

    def positions(self, plan: Mapping[str, Tensor]) -> dict[str, list[tuple[int, Tensor]]]:
        """For every split tensor, ``(dim, positions along dim)`` under ``plan``; concatenated groups'
        positions follow each other along their dim, in part order."""
        return {
            tensor: [(on_dim[0][1].dim, dim_positions(on_dim, plan)) for on_dim in _by_dim(claims)]
            for tensor, claims in self._axes_by_tensor.items()
        }


def dim_positions(claims: Sequence[tuple[WidthGroup, Axis]], plan: Mapping[str, Tensor]) -> Tensor:
    """Positions along one tensor dim under ``plan``, from the groups' ``claims`` on it in part order:
    each group's positions after the full extent (at the groups' widths) of the parts before it."""
    offset, pieces = 0, []
    for group, axis in claims:
        pieces.append(axis_positions(axis, group.width, plan[group.name]) + offset)
        offset += _extent(group, axis)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _extent(group: WidthGroup, axis: Axis) -> int:
    """Positions ``group``'s ``axis`` spans along its dim."""
    return group.width * axis.unit * axis.blocks


def _by_dim(claims: Sequence[tuple[WidthGroup, Axis]]) -> list[list[tuple[WidthGroup, Axis]]]:
    """A tensor's claims (sorted by dim, then part) split into one list per dim."""
    out: list[list[tuple[WidthGroup, Axis]]] = []
    for claim in claims:
        if out and out[-1][0][1].dim == claim[1].dim:
            out[-1].append(claim)
        else:
            out.append([claim])
    return out


def _check_dim(tensor: str, dim: int, claims: Sequence[tuple[WidthGroup, Axis]], size: int) -> None:
    """The groups on one tensor dim fill it exactly: one group, or concatenated parts 0..n-1 of one block each."""
    if len(claims) == 1:
        group, axis = claims[0]
        if size != _extent(group, axis):
            raise ValueError(f"group {group.name!r}: {tensor} dim {dim} has size {size}, expected {_extent(group, axis)}")
        return
    names = [g.name for g, _ in claims]
    if [a.part for _, a in claims] != list(range(len(claims))) or any(a.blocks != 1 for _, a in claims):
        raise ValueError(f"{tensor} dim {dim}: groups {names} must be concatenated parts 0..{len(claims) - 1} of one block each")
    if size != sum(_extent(g, a) for g, a in claims):
        raise ValueError(f"groups {names}: {tensor} dim {dim} has size {size}, expected {sum(_extent(g, a) for g, a in claims)}")


def axis_positions(axis: Axis, width: int, units: Tensor) -> Tensor:
    """Positions along ``axis`` covered by group ``units`` (vectorized)."""
    offsets = torch.arange(axis.unit)
    blocks = torch.arange(axis.blocks) * (width * axis.unit)
    grid = blocks[:, None, None] + units[None, :, None] * axis.unit + offsets[None, None, :]
    return grid.reshape(-1)
