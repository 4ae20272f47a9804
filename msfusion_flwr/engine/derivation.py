"""Width groups derived from a model's own graph, and narrow instances cut by them.

A model without hand-written :class:`~.groups.GroupDecl` lists gets its width
groups from Torch-Pruning's ``DependencyGraph`` (DepGraph, Fang et al., CVPR
2023): one forward pass of an example input records which channels are coupled
(a conv's outputs, the norms and activations that follow, the next layers'
inputs, everything added to the same residual stream, a depthwise conv's ins
and outs). Every coupled set becomes one :class:`~.groups.WidthGroup` through
the same per-module-type axis rules hand-written declarations use
(:data:`~.groups.OUTPUT_RULES`, :data:`~.groups.INPUT_RULES`); how many
positions one unit covers along each axis (a flatten of a 2x2 map: 4) is read
off Torch-Pruning's index mapping. Bare ``nn.Parameter``s coupled to a group
(a class token, position embeddings, a layer scale) are axes of it too. A
layer that reads a concatenation holds an axis of each group concatenated,
ranked by where the group's channels start along it (``Axis.part``). The
channels that reach the model's output (the classes) and the model's input
channels are never split.

:func:`narrow_to` cuts a model, in place, to given group widths with
Torch-Pruning's per-layer pruning functions (which also fix ``in_channels``,
``groups``, ``num_features``, ...); on a model whose parameters live on the
meta device it allocates nothing but the narrow model's buffers.

Two hints say what tracing cannot: ``units`` (channels per unit, e.g. an
attention head's size) and ``stacked`` (a fused q/k/v projection whose outputs
are 3 stacked copies of its group's units). Third-party layer types join with
an axis rule in :data:`~.groups.OUTPUT_RULES`/:data:`~.groups.INPUT_RULES` and a
Torch-Pruning pruner in :data:`PRUNERS`.

What tracing cannot see, it cannot split correctly: data-dependent control flow
(only the traced path is recorded) and operations Torch-Pruning treats as
element-wise although they mix channels. Such models declare their groups by
hand (``width_group_decls()``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import ops
from torch_pruning.pruner import function as tp_function

from .groups import (
    INPUT_RULES,
    OUTPUT_RULES,
    Axis,
    SplitSpec,
    WidthGroup,
    _rule_for,
    axis_positions,
)

ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)
"""Layers whose output channels start a group (Torch-Pruning's roots)."""


PRUNERS: dict[type[nn.Module], tp_function.BasePruningFunc] = {}
"""Torch-Pruning pruners for layer types it does not know (e.g. ``transformers``' ``Conv1D``)."""


class DerivationError(ValueError):
    """Width groups cannot be derived; the message names the module and what to declare by hand."""


def _layout(name: str, positions: Tensor, roots: Tensor, width: int) -> tuple[int, int]:
    """``(unit, blocks)`` of an :class:`Axis` whose unit ``r`` covers ``positions[roots == r]`` (counted from
    the first of them: a concatenation puts a group's channels after other groups')."""
    positions = positions - positions.min()
    if len(positions) % width or torch.bincount(roots, minlength=width).unique().numel() != 1:
        raise DerivationError(f"{name}: its channels are not an equal number per unit of the group it is coupled to")
    per_unit = len(positions) // width
    order = torch.argsort(roots * (int(positions.max()) + 1) + positions)
    grid = positions[order].view(width, per_unit)
    first = grid[0]
    unit = int((first - first[0] == torch.arange(per_unit)).cumprod(0).sum())
    if per_unit % unit == 0:
        blocks = per_unit // unit
        expected = axis_positions(Axis(name, 0, unit, blocks), width, torch.arange(width))
        if torch.equal(grid, expected.view(blocks, width, unit).transpose(0, 1).reshape(width, per_unit)):
            return unit, blocks
    raise DerivationError(
        f"{name}: the units of its group sit at positions no (unit, blocks) layout describes "
        "(a split?); declare this model's width groups by hand (width_group_decls)"
    )


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.out_channels


def _module_axes(module: nn.Module, name: str, consumes: bool) -> list[tuple[str, int]]:
    """``(local tensor, dim)`` of ``module`` along which a group's units run, on its output or input side."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        if not _is_depthwise(module):
            raise DerivationError(f"{name}: a grouped convolution ({module.groups} groups) cannot be split by derivation; declare its groups by hand")
        consumes = False  # a depthwise conv's inputs are its outputs: one group, along weight dim 0
    rules = INPUT_RULES if consumes else OUTPUT_RULES
    try:
        return _rule_for(rules, module)(module)
    except TypeError:
        side = "input" if consumes else "output"
        raise DerivationError(
            f"{name}: no {side} axis rule for {type(module).__name__}; register one in "
            f"msfusion_flwr.engine.groups.{side.upper()}_RULES or declare the model's width groups by hand"
        ) from None


def _output_node(graph: tp.DependencyGraph, output: Tensor) -> Any:
    for node in graph.module2node.values():
        if node.grad_fn is output.grad_fn:
            return node
    return None


def derive_groups(
    model: nn.Module,
    example_inputs: Any,
    output_transform: Callable[[Any], Tensor] | None = None,
    units: Mapping[str, int] | None = None,
    stacked: Mapping[str, int] | None = None,
) -> list[WidthGroup]:
    """The width groups of ``model``, traced on ``example_inputs`` (the meta device is enough).

    ``output_transform`` picks the output tensor from what ``model`` returns
    (e.g. ``lambda out: out.logits``); its channels are never split.
    ``units`` maps a layer name to the channels per unit of the group that
    layer produces (an attention projection's head dimension, so that heads,
    not channels, are the units). ``stacked`` maps a layer to the number of
    equal parts its outputs stack, each holding every unit of its group once
    (a fused q/k/v projection: 3). Groups are named after their
    first-registered producing layer and ordered as the model registers it.
    """
    traced: list[Tensor] = []

    def keep_output(out: Any) -> Tensor:
        tensor = output_transform(out) if output_transform else out
        traced.append(tensor)
        return tensor

    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=example_inputs, output_transform=keep_output, customized_pruners=dict(PRUNERS) or None
    )
    output = _output_node(graph, traced[0])
    names = {module: name for name, module in model.named_modules()}
    order = {name: i for i, name in enumerate(names.values())}
    groups, starts = [], {}
    for tp_group in graph.get_all_groups(root_module_types=(*ROOT_TYPES, *PRUNERS)):
        out_nodes = [item.dep.target for item in tp_group if graph.is_out_channel_pruning_fn(item.dep.handler)]
        if output is not None and any(node is output for node in out_nodes):
            continue  # the model's outputs (classes, vocabulary): never split
        group, group_starts = _width_group(graph, tp_group, names, order, stacked or {})
        groups.append(group)
        starts |= {(group.name, *key): start for key, start in group_starts.items()}
    groups = _concatenated_parts([_with_hint(group, units or {}) for group in groups], starts)
    return sorted(groups, key=lambda g: order[g.name])


def _with_hint(group: WidthGroup, units: Mapping[str, int]) -> WidthGroup:
    """``group`` with ``units[layer]`` consecutive channels per unit, when it has a hinted layer."""
    producers = {a.tensor.rpartition(".")[0] for a in group.axes if not a.consumes}
    hinted = {units[layer] for layer in producers if layer in units}
    if not hinted:
        return group
    size = min(hinted)
    if len(hinted) > 1 or group.width % size:
        raise DerivationError(f"group {group.name!r}: unit hints {sorted(hinted)} do not divide its {group.width} channels into equal units")
    axes = tuple(replace(a, unit=a.unit * size) for a in group.axes)
    return WidthGroup(group.name, group.width // size, axes)


def _concatenated_parts(groups: Sequence[WidthGroup], starts: Mapping[tuple[str, str, int], int]) -> list[WidthGroup]:
    """``groups`` with ``part`` set where several of them share a tensor dim (a layer reading a concatenation),
    ranked by where each group's channels start along it (``starts``: (group, tensor, dim) -> position)."""
    sharing: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for group in groups:
        for axis in group.axes:
            sharing.setdefault((axis.tensor, axis.dim), []).append((starts[(group.name, axis.tensor, axis.dim)], group.name))
    parts = {
        (name, tensor, dim): rank
        for (tensor, dim), claimants in sharing.items() if len(claimants) > 1
        for rank, (_, name) in enumerate(sorted(claimants))
    }  # fmt: skip
    return [
        WidthGroup(g.name, g.width, tuple(replace(a, part=parts.get((g.name, a.tensor, a.dim), 0)) for a in g.axes))
        for g in groups
    ]


def _width_group(
    graph: tp.DependencyGraph,
    tp_group: Any,
    names: Mapping[nn.Module, str],
    order: Mapping[str, int],
    stacked: Mapping[str, int],
) -> tuple[WidthGroup, dict[tuple[str, int], int]]:
    """One Torch-Pruning group as a width group, named after its first-registered producing layer, and where
    its channels start along each of its axes ((tensor, dim) -> position)."""
    root = tp_group[0].dep.target.module
    producers = [
        names[item.dep.target.module] for item in tp_group
        if item.dep.target.module in names and graph.is_out_channel_pruning_fn(item.dep.handler)
    ]
    name = min(producers, key=order.__getitem__)
    parts = _stacked_parts(names[root], producers, stacked)
    channels = graph.get_pruner_of_module(root).get_out_channels(root)
    if channels % parts:
        raise DerivationError(f"{names[root]}: stacked hint {parts} does not divide its {channels} outputs")
    width = channels // parts
    axes: dict[tuple[str, int], Axis] = {}
    starts: dict[tuple[str, int], int] = {}
    for item in tp_group:
        target = item.dep.target
        positions, roots = torch.as_tensor(item.idxs), torch.as_tensor(item.root_idxs) % width
        if target.type == ops.OPTYPE.PARAMETER:  # a bare nn.Parameter (a class token, a layer scale)
            key = graph._param_to_name[target.module]
            unit, blocks = _layout(key, positions, roots, width)
            dim = target.pruning_dim % target.module.dim()
            axes.setdefault((key, dim), Axis(key, dim, unit, blocks))
            starts.setdefault((key, dim), int(positions.min()))
            continue
        module = target.module
        if module not in names:
            continue  # Torch-Pruning's stand-ins for element-wise ops, reshapes, ...: no tensors
        module_name = names[module]
        consumes = not graph.is_out_channel_pruning_fn(item.dep.handler)
        positions, roots = _one_copy(graph, module, module_name, consumes, positions, roots, parts)
        unit, blocks = _layout(module_name, positions, roots, width)
        for local, dim in _module_axes(module, module_name, consumes):
            key = f"{module_name}.{local}" if module_name else local
            axes.setdefault((key, dim), Axis(key, dim, unit, blocks, consumes and not _is_depthwise(module)))
            starts.setdefault((key, dim), int(positions.min()))
    return WidthGroup(name, width, tuple(axes.values())), starts


def _stacked_parts(root: str, producers: Sequence[str], stacked: Mapping[str, int]) -> int:
    """How many stacked copies of the group's units the group's root layer outputs (1 without a hint)."""
    misplaced = [layer for layer in producers if layer in stacked and layer != root]
    if misplaced:
        raise DerivationError(
            f"{misplaced[0]}: a stacked hint names a layer that does not start its group (that is {root})"
        )
    return int(stacked.get(root, 1))


def _one_copy(
    graph: tp.DependencyGraph,
    module: nn.Module,
    name: str,
    consumes: bool,
    positions: Tensor,
    roots: Tensor,
    parts: int,
) -> tuple[Tensor, Tensor]:
    """A layer's ``(position, unit)`` pairs, each copy of a stacked unit it holds counted once.

    Torch-Pruning carries every stacked part through an attention op as if it
    were element-wise, so a layer that reads the attention's output (one copy
    of each unit) is mapped positions beyond its channels; modulo its channels
    they are the positions of the same units. Without a stacked hint such a
    mapping is an error: the split would index past the layer's tensors.
    """
    pruner = graph.get_pruner_of_module(module)
    channels = pruner.get_in_channels(module) if consumes else pruner.get_out_channels(module)
    if channels is None or not len(positions) or int(positions.max()) < channels:
        return positions, roots
    if parts == 1:
        side = "inputs" if consumes else "outputs"
        raise DerivationError(
            f"{name}: tracing maps {int(positions.max()) + 1} channels onto its {channels} {side} "
            "(an attention op over a fused q/k/v projection?); pass stacked={<that projection>: <parts>}"
        )
    pairs = torch.stack((positions % channels, roots), dim=1).unique(dim=0)
    return pairs[:, 0], pairs[:, 1]


PRUNED_TYPES = {
    ops.OPTYPE.CONV, ops.OPTYPE.DEPTHWISE_CONV, ops.OPTYPE.LINEAR, ops.OPTYPE.BN, ops.OPTYPE.LN, ops.OPTYPE.EMBED,
    ops.OPTYPE.GN, ops.OPTYPE.IN, ops.OPTYPE.PRELU,
}  # fmt: skip
"""Module types whose tensors Torch-Pruning's per-layer functions cut (and whose attributes they fix)."""


def _narrow_parameter(module: nn.Module, name: str, dim: int, dropped: Tensor) -> None:
    param = module._parameters[name]
    keep = torch.ones(param.shape[dim], dtype=torch.bool)
    keep[dropped] = False
    kept = torch.nonzero(keep).flatten().to(param.device)
    module._parameters[name] = nn.Parameter(param.detach().index_select(dim, kept), param.requires_grad)


def narrow_to(model: nn.Module, groups: Sequence[WidthGroup], widths: Mapping[str, int]) -> nn.Module:
    """Cut ``model`` in place to ``widths[g]`` units of every group ``g`` (its first units; values are
    the caller's to load). Layers keep working: Torch-Pruning's pruning functions fix their attributes.
    Each layer side is cut once, by every group it holds (a layer reading a concatenation holds several)."""
    for group in groups:
        width = int(widths.get(group.name, group.width))
        if not 0 < width <= group.width:
            raise ValueError(f"group {group.name!r}: width {width} outside 1..{group.width}")
    spec = SplitSpec(groups, {k: v.shape for k, v in model.state_dict().items()})
    kept = spec.positions({g.name: torch.arange(int(widths.get(g.name, g.width))) for g in groups})
    consumes = {(a.tensor, a.dim): a.consumes for g in groups for a in g.axes}
    modules = dict(model.named_modules())
    done: set[tuple[str, bool]] = set()
    for tensor, dims in kept.items():
        module_name, _, local = tensor.rpartition(".")
        module = modules[module_name]
        for dim, positions in dims:
            keep = torch.zeros(spec.shapes[tensor][dim], dtype=torch.bool)
            keep[positions] = True
            dropped = torch.nonzero(~keep).flatten()
            if not len(dropped):
                continue
            pruner = PRUNERS.get(type(module)) or tp_function.PrunerBox.get(ops.module2type(module))
            if pruner is None or (type(module) not in PRUNERS and ops.module2type(module) not in PRUNED_TYPES):
                _narrow_parameter(module, local, dim, dropped)  # a bare nn.Parameter of a container
                continue
            side = consumes[(tensor, dim)]
            if (module_name, side) in done:
                continue
            done.add((module_name, side))
            prune = pruner.prune_in_channels if side else pruner.prune_out_channels
            prune(module, dropped.tolist())
    return model
