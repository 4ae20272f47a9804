"""Method name -> strategy: Flower's FedAvg, or the partial-training engine with the method's index policy."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from ..config import METHODS, ConfigError, MethodSettings, RunConfig
from ..data import load_server_set, model_kwargs
from ..engine.groups import SplitSpec
from ..engine.policies import (
    BlockShift,
    DoubleShift,
    FullWidth,
    IndexPolicy,
    OrderedDropout,
    RandomSubset,
    RollingWindow,
    StaticPrefix,
    window_length,
)
from ..models import model_class, model_factory
from .feddf import EnsembleDistillation
from .nodes import Budgets
from .privacy import private_rule
from .strategy import MeteredFedAvg, SubmodelStrategy
from .trust import ReferenceTrust


def double_shift(m: MethodSettings) -> IndexPolicy:
    """MSfusion's policy: rolling windows (:class:`DoubleShift`), or disjoint blocks cut at the smallest budget."""
    if m.window_layout == "blocks":
        return BlockShift(m.block_ratio, m.shift_step, m.inter_participant_shift, m.block_count, frozenset(m.shared_groups))
    return DoubleShift(shift_step=m.shift_step, overlap=m.overlap, inter_participant=m.inter_participant_shift)


POLICIES: dict[str, Callable[[MethodSettings], IndexPolicy]] = {
    "msfusion": double_shift,
    "heterofl": lambda m: StaticPrefix(),
    "fedrolex": lambda m: RollingWindow(),
    "fd": lambda m: RandomSubset(),
    "fjord": lambda m: OrderedDropout(levels=m.fjord_levels),
    "fedavg-small": lambda m: FullWidth(),
}
"""Partial-training methods: the index policy each one runs over the engine."""

DISTILLATION_METHODS: dict[str, str] = {"feddf": "heterofl"}
"""Methods that fuse by ensemble distillation on the server slice (``server-data-fraction``),
and the partial-training method (:data:`POLICIES`) whose participants they run:
FedDF with heterogeneous widths trains HeteroFL's static-prefix sub-models."""

FULL_MODEL_METHODS = ("fedavg",)
"""Methods that run Flower's own strategy on the full model."""
assert set(METHODS) == set(POLICIES) | set(DISTILLATION_METHODS) | set(FULL_MODEL_METHODS)


def global_widths(run: RunConfig) -> dict[str, int] | None:
    """Widths of the global model: full, except for ``fedavg-small`` whose global model is the narrow one,
    and for block windows with a ``block-count`` n, whose global model is n blocks wide, or with
    ``shared-groups``, which the global model holds one block wide."""
    full = model_class(run.model.name).FULL_WIDTHS  # type: ignore[attr-defined]
    m = run.method
    if m.name == "fedavg-small":
        return {name: window_length(m.split_ratio, k) for name, k in full.items()}
    if m.name == "msfusion" and m.window_layout == "blocks" and (m.block_count or m.shared_groups):
        ratio = m.block_ratio
        return {
            name: window_length(ratio, k) if name in m.shared_groups else (m.block_count * window_length(ratio, k) if m.block_count else k)
            for name, k in full.items()
        }
    return None


def make_strategy(run: RunConfig, spec: SplitSpec, server_set: Dataset | None = None) -> SubmodelStrategy | MeteredFedAvg:
    """The strategy named by ``method``: Flower's FedAvg, or the engine with that method's policy.

    ``fedavg`` with a robust or private aggregation rule (anything but the
    plain example-weighted mean) runs through the engine too, every participant
    holding the whole model (:class:`~msfusion_flwr.engine.policies.FullWidth`),
    since Flower's FedAvg has no such rule. Distillation methods (``feddf``)
    and reference-scored aggregation (``aggregation-weights = "reference"``)
    also get the server set: ``server_set``, or else the run's server slice
    (:func:`~msfusion_flwr.data.load_server_set`).
    """
    method, federation = run.method, run.federation
    if method.name == "fedavg" and run.aggregation.plain:
        if federation.messages_in_flight:
            raise ConfigError(
                "config key 'messages-in-flight' needs a partial-training method or a robust rule (method 'fedavg' "
                f"with the plain mean is Flower's FedAvg, which sends a round's messages at once), got {federation.messages_in_flight}"
            )
        return MeteredFedAvg(
            node_wait_timeout=federation.node_wait_timeout,
            query_timeout=federation.round_timeout,
            fraction_train=federation.fraction_train,
            min_train_nodes=1,
            min_available_nodes=federation.min_available_nodes,
        )
    name = "fedavg-small" if method.name == "fedavg" else DISTILLATION_METHODS.get(method.name, method.name)
    policy = POLICIES[name](method)
    budgets = Budgets(method.split_ratio, method.budgets)
    options = {
        "fraction_train": federation.fraction_train,
        "min_available_nodes": federation.min_available_nodes,
        "seed": run.seed,
        "query_timeout": federation.round_timeout,
        "node_wait_timeout": federation.node_wait_timeout,
        "calibrate": run.model.calibrated,
        "rule": private_rule(run.aggregation, run.privacy),
    }
    if run.aggregation.weighting == "reference":
        return ReferenceTrust(
            spec,
            policy,
            budgets,
            make_model=model_factory(run.model, **model_kwargs(run.data)),
            server_set=load_server_set(run.data) if server_set is None else server_set,
            local=run.local,
            num_rounds=run.federation.num_server_rounds,
            **options,
        )
    if method.name in DISTILLATION_METHODS:
        return EnsembleDistillation(
            spec,
            policy,
            budgets,
            make_model=model_factory(run.model, **model_kwargs(run.data)),
            server_set=load_server_set(run.data) if server_set is None else server_set,
            distill=run.distill,
            **options,
        )
    return SubmodelStrategy(spec, policy, budgets, **options)
