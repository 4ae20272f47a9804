"""The run config: its keys and defaults, their validation, and the typed settings built from them.

A run config is a flat mapping of string keys (``[tool.flwr.app.config]`` in
pyproject.toml lists them with their defaults; a test checks that it matches
:data:`DEFAULTS`). It is resolved and validated once, at a boundary (ServerApp
start, :func:`msfusion_flwr.apps.run_experiment`, the comparison harness), into
a :class:`RunConfig`: frozen dataclasses, one per concern, that every module
below the boundary receives instead of the mapping. A bad value raises
:class:`ConfigError` with one line naming the key, before anything runs.

=============  ==========================================  =====================================
section        type                                        keys
=============  ==========================================  =====================================
``method``     :class:`MethodSettings`                     method, split-ratio, budgets, overlap, shift-step, ...
``model``      :class:`~msfusion_flwr.models.ModelSettings`  model, output-scaling
``data``       :class:`~msfusion_flwr.data.DataSettings`   dataset, data-dir, partitioner, ..., seed
``local``      :class:`TrainSettings`                      local-epochs, batch-size, learning-rate, ...
``distill``    :class:`DistillSettings`                    distill-*
``federation`` :class:`FederationSettings`                 num-server-rounds, fraction-train, ..., node-wait-timeout, seed
``aggregation`` :class:`~msfusion_flwr.engine.robust.AggregationRule`  aggregation, trim-fraction, aggregation-weights, ...
``privacy``    :class:`PrivacySettings`                    dp-clip, dp-noise-multiplier, dp-delta
``faults``     :class:`FaultSettings`                      dropout-rate, straggler-rate, attack, ...
``outputs``    :class:`OutputSettings`                     output-dir, checkpoint-every, resume, participant-state-dir
=============  ==========================================  =====================================

:meth:`RunConfig.to_dict` gives the flat mapping back: the form that
``config.json``, checkpoints and the harness store and compare.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .data import DATASETS, NUM_CLASSES, PARTITIONERS, TEXT_DATASETS, TEXT_PARTITIONERS, DataSettings
from .engine.policies import block_count
from .engine.robust import STATISTICS, WEIGHTINGS, AggregationRule
from .models import MODELS, OUTPUT_SCALINGS, ModelSettings, model_class
from .models.derived import HF_PREFIX, TORCHVISION_PREFIX, is_derived_name
from .models.placement import is_device_name

WINDOW_LAYOUTS = ("rolling", "blocks")
METHODS = ("msfusion", "fedavg", "fedavg-small", "heterofl", "fedrolex", "fd", "fjord", "feddf")
"""``fedavg`` is Flower's own FedAvg on the full model; the others run the
partial-training strategy with their index policy (see engine/policies.py);
``feddf`` runs HeteroFL's participants and fuses by ensemble distillation on
the server slice (``server-data-fraction``, which it requires to be > 0)."""


OPTIMIZERS = ("sgd", "adam")
"""Local optimizers (``optimizer``), fresh every round."""
LEARNING_RATE_SCHEDULES = ("constant", "cosine")
"""``learning-rate-schedule``: how the server sets each round's local learning rate (:meth:`TrainSettings.at_round`)."""


class ConfigError(ValueError):
    """An invalid run-config value; the message is one line naming the key."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class MethodSettings:
    """Which method runs and how it plans sub-models."""

    name: str = "msfusion"
    split_ratio: float = 0.25
    """r, every participant's budget unless ``budgets`` or its node config says otherwise."""
    budgets: tuple[float, ...] = ()
    """Per-partition split ratios, cycled by partition id; empty: everybody ``split_ratio``."""
    overlap: float | str = "auto"
    shift_step: int = 1
    inter_participant_shift: bool = True
    window_layout: str = "blocks"
    """MSfusion's windows: ``blocks`` (disjoint blocks, policies.BlockShift; the default, by the measurements in
    docs/results.md) or ``rolling`` (windows of units, any start: the paper's reading, ``conf/msfusion-paper.toml``)."""
    block_count: int = 2
    """``blocks`` layout: how many blocks wide the global model is (0: the full model, every block that fits)."""
    shared_groups: tuple[str, ...] = ()
    """``blocks`` layout: width groups that are not cut into blocks but held whole, at the block length, by
    every participant: a trunk that all block models share."""
    fjord_levels: int = 8

    @property
    def block_ratio(self) -> float:
        """The split ratio blocks are cut at: the run's smallest budget."""
        return min(self.budgets) if self.budgets else self.split_ratio


@dataclass(frozen=True)
class TrainSettings:
    """A participant's local optimisation; ``seed`` is set per round by the participant."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    learning_rate_schedule: str = "constant"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.5
    codistill_weight: float = 0.0
    codistill_temperature: float = 1.0
    optimizer: str = "sgd"
    seed: int = 0
    device: str = "cpu"
    """``torch-device``: where participants train and the server evaluates (:mod:`.models.placement`)."""

    def at_round(self, server_round: int, num_rounds: int) -> TrainSettings:
        """These settings with round ``server_round``'s learning rate, of a run of ``num_rounds`` rounds.

        ``constant``: ``learning-rate`` every round. ``cosine``: ``learning-rate`` times
        ``(1 + cos(pi (t - 1) / T)) / 2`` in round ``t`` of ``T``, from the full rate in round 1 down to
        ``(1 + cos(pi (T - 1) / T)) / 2`` of it in the last, never 0 (cosine annealing without restarts,
        stepped once a round: every participant of a round trains at the same rate).
        """
        if self.learning_rate_schedule == "constant":
            return self
        factor = 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / num_rounds))
        return dataclasses.replace(self, learning_rate=self.learning_rate * factor, learning_rate_schedule="constant")

    @property
    def keeps_previous(self) -> bool:
        """Whether a participant needs its previous round's sub-model (the contrastive term's or codistillation's)."""
        return self.contrastive_weight > 0 or self.codistill_weight > 0


@dataclass(frozen=True)
class DistillSettings:
    """Server-side distillation hyper-parameters (FedDF)."""

    steps: int = 50
    batch_size: int = 128
    learning_rate: float = 1e-3
    temperature: float = 1.0


@dataclass(frozen=True)
class FederationSettings:
    """Rounds, sampling and waiting on the server."""

    num_server_rounds: int = 20
    fraction_train: float = 1.0
    min_available_nodes: int = 2
    round_timeout: float = 3600.0
    """Seconds the server waits for a round's replies (and for profile queries)."""
    node_wait_timeout: float = 60.0
    """Seconds the server waits for ``min_available_nodes`` nodes before giving up, at start and before each round."""
    messages_in_flight: int = 0
    """The most train messages awaiting a reply at a time (0: a round's messages all at once)."""
    max_failed_rounds: int = 3
    """Stop the run after this many rounds in a row in which no participant's update was accepted (0: never)."""
    eval_every: int = 1
    seed: int = 0


@dataclass(frozen=True)
class PrivacySettings:
    """Differential privacy of the participants' data (:mod:`msfusion_flwr.server.privacy`)."""

    clip: float = 0.0
    """C: every participant clips its update (sub-model minus the slice received) to this L2 norm; 0: off."""
    noise_multiplier: float = 0.0
    """z: the server adds Gaussian noise of std z * C to every element's sum over its holders; 0: off."""
    delta: float = 1e-5

    @property
    def enabled(self) -> bool:
        """True when the server adds noise (a run with a privacy guarantee)."""
        return self.noise_multiplier > 0


ATTACKS = ("none", "scale", "sign-flip", "random", "inflate-count")
"""Simulated hostile participants (``attack``), see :mod:`msfusion_flwr.device.faults`."""


@dataclass(frozen=True)
class FaultSettings:
    """Simulated failures and attacks of participants (experiments)."""

    dropout_rate: float = 0.0
    straggler_rate: float = 0.0
    attack: str = "none"
    attack_fraction: float = 0.0
    """Fraction of the partitions (a seeded choice, fixed for the run) that attack."""
    attack_scale: float = 10.0


@dataclass(frozen=True)
class OutputSettings:
    """Where a run writes, checkpoints and keeps participant state."""

    output_dir: str = ""
    checkpoint_every: int = 0
    resume: bool = False
    participant_state_dir: str = ""


SECTIONS: dict[str, type] = {
    "method": MethodSettings,
    "model": ModelSettings,
    "data": DataSettings,
    "local": TrainSettings,
    "distill": DistillSettings,
    "federation": FederationSettings,
    "aggregation": AggregationRule,
    "privacy": PrivacySettings,
    "faults": FaultSettings,
    "outputs": OutputSettings,
}
"""Section name -> its settings type (the fields of :class:`RunConfig`)."""


# --------------------------------------------------------------------------- validation rules

Rule = tuple[Callable[[Any], bool], str]
"""(value is valid, what a valid value is: for the error message)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _choice(options: Iterable[str]) -> Rule:
    options = tuple(options)
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


def _number(lo: float, hi: float, lo_open: bool, hi_open: bool) -> Rule:
    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return above and below

    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    return ok, f"a number in {left}{lo}, {hi}{right}"


def _integer(lo: int) -> Rule:
    return (lambda v: _is_int(v) and v >= lo), f"an integer >= {lo}"


def _string() -> Rule:
    return (lambda v: isinstance(v, str)), "a string"


def _boolean() -> Rule:
    return (lambda v: isinstance(v, bool)), "true or false"


def parse_budgets(text: str) -> tuple[float, ...]:
    """``"0.25,0.5,1"`` -> (0.25, 0.5, 1.0); empty -> (). Raises ValueError."""
    if not text.strip():
        return ()
    ratios = tuple(float(part) for part in text.split(","))
    if not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(text)
    return ratios


def format_budgets(ratios: tuple[float, ...]) -> str:
    """Inverse of :func:`parse_budgets`: ``(0.25, 0.5)`` -> ``"0.25,0.5"``."""
    return ",".join(repr(float(r)) for r in ratios)


def parse_names(text: str) -> tuple[str, ...]:
    """``"conv1, conv2"`` -> ("conv1", "conv2"); empty -> ()."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _budgets() -> Rule:
    def ok(v: Any) -> bool:
        try:
            return isinstance(v, str) and parse_budgets(v) is not None
        except ValueError:
            return False

    return ok, "a comma-separated list of split ratios in (0, 1], or empty"


def _overlap() -> Rule:
    number_ok, _ = _number(0.0, 1.0, False, True)
    return (lambda v: v == "auto" or number_ok(v)), "'auto' or a number in [0, 1)"


def _device_name() -> Rule:
    return (lambda v: isinstance(v, str) and is_device_name(v)), "'cpu', 'auto' or a PyTorch device such as 'cuda' or 'cuda:1'"


def _vocab_size() -> Rule:
    return (lambda v: _is_int(v) and (v == 0 or v >= 2)), "0 (every word) or an integer >= 2"


# --------------------------------------------------------------------------- keys


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Key:
    """One run-config key: the fields it sets, its rule, and how its flat value maps to the typed one."""

    targets: tuple[tuple[str, str], ...]
    """(section, field) pairs it sets; the first is where :meth:`RunConfig.to_dict` reads it back."""
    rule: Rule
    to_field: Callable[[Any], Any] = _same
    to_flat: Callable[[Any], Any] = _same


INF = math.inf


def _key(section: str, name: str, rule: Rule, **kwargs: Callable[[Any], Any]) -> Key:
    return Key(((section, name),), rule, **kwargs)


KEYS: dict[str, Key] = {
    "method": _key("method", "name", _choice(METHODS)),
    "dataset": _key("data", "dataset", _choice(DATASETS)),
    "model": _key(
        "model", "name",
        ((lambda v: v in MODELS or (isinstance(v, str) and is_derived_name(v))),
         "one of " + ", ".join(repr(m) for m in MODELS) + f" or {TORCHVISION_PREFIX + '<name>'!r} (any torchvision classifier) or {HF_PREFIX + '<type or config>'!r} (a transformers image classifier)"),
    ),
    "num-server-rounds": _key("federation", "num_server_rounds", _integer(1)),
    "fraction-train": _key("federation", "fraction_train", _number(0.0, 1.0, True, False)),
    "min-available-nodes": _key("federation", "min_available_nodes", _integer(1)),
    "split-ratio": _key("method", "split_ratio", _number(0.0, 1.0, True, False)),
    "budgets": _key("method", "budgets", _budgets(), to_field=parse_budgets, to_flat=format_budgets),
    "overlap": _key("method", "overlap", _overlap()),
    "shift-step": _key("method", "shift_step", _integer(0)),
    "inter-participant-shift": _key("method", "inter_participant_shift", _boolean()),
    "window-layout": _key("method", "window_layout", _choice(WINDOW_LAYOUTS)),
    "block-count": _key("method", "block_count", _integer(0)),
    "shared-groups": _key("method", "shared_groups", _string(), to_field=parse_names, to_flat=",".join),
    "fjord-levels": _key("method", "fjord_levels", _integer(1)),
    "distill-steps": _key("distill", "steps", _integer(1)),
    "distill-batch-size": _key("distill", "batch_size", _integer(1)),
    "distill-learning-rate": _key("distill", "learning_rate", _number(0.0, INF, True, True)),
    "distill-temperature": _key("distill", "temperature", _number(0.0, INF, True, True)),
    "contrastive-weight": _key("local", "contrastive_weight", _number(0.0, INF, False, True)),
    "contrastive-temperature": _key("local", "contrastive_temperature", _number(0.0, INF, True, True)),
    "codistill-weight": _key("local", "codistill_weight", _number(0.0, INF, False, True)),
    "codistill-temperature": _key("local", "codistill_temperature", _number(0.0, INF, True, True)),
    "output-scaling": _key("model", "output_scaling", _choice(OUTPUT_SCALINGS)),
    "local-epochs": _key("local", "epochs", _integer(1)),
    "batch-size": _key("local", "batch_size", _integer(1)),
    "learning-rate": _key("local", "learning_rate", _number(0.0, INF, True, True)),
    "learning-rate-schedule": _key("local", "learning_rate_schedule", _choice(LEARNING_RATE_SCHEDULES)),
    "momentum": _key("local", "momentum", _number(0.0, 1.0, False, True)),
    "weight-decay": _key("local", "weight_decay", _number(0.0, INF, False, True)),
    "optimizer": _key("local", "optimizer", _choice(OPTIMIZERS)),
    "torch-device": _key("local", "device", _device_name()),
    "seq-len": _key("data", "seq_len", _integer(2)),
    "train-split": _key("data", "train_split", _choice(("train", "valid"))),
    "vocab-size": _key("data", "vocab_size", _vocab_size()),
    "partitioner": _key("data", "partitioner", _choice(PARTITIONERS)),
    "dirichlet-alpha": _key("data", "dirichlet_alpha", _number(0.0, INF, True, True)),
    "classes-per-partition": _key("data", "classes_per_partition", _integer(1)),
    "data-fraction": _key("data", "data_fraction", _number(0.0, 1.0, True, False)),
    "test-examples": _key("data", "test_examples", _integer(0)),
    "server-data-fraction": _key("data", "server_fraction", _number(0.0, 1.0, False, True)),
    "seed": Key((("federation", "seed"), ("data", "seed")), _integer(0)),
    "dropout-rate": _key("faults", "dropout_rate", _number(0.0, 1.0, False, True)),
    "straggler-rate": _key("faults", "straggler_rate", _number(0.0, 1.0, False, True)),
    "attack": _key("faults", "attack", _choice(ATTACKS)),
    "attack-fraction": _key("faults", "attack_fraction", _number(0.0, 1.0, False, False)),
    "attack-scale": _key("faults", "attack_scale", _number(0.0, INF, True, True)),
    "aggregation": _key("aggregation", "statistic", _choice(STATISTICS)),
    "trim-fraction": _key("aggregation", "trim_fraction", _number(0.0, 0.5, False, True)),
    "aggregation-weights": _key("aggregation", "weighting", _choice(WEIGHTINGS)),
    "weight-cap": _key("aggregation", "weight_cap", _number(1.0, INF, False, True)),
    "clip-updates": _key("aggregation", "clip", _number(0.0, INF, False, True)),
    "screen-updates": _key("aggregation", "screen", _boolean()),
    "dp-clip": _key("privacy", "clip", _number(0.0, INF, False, True)),
    "dp-noise-multiplier": _key("privacy", "noise_multiplier", _number(0.0, INF, False, True)),
    "dp-delta": _key("privacy", "delta", _number(0.0, 1.0, True, True)),
    "round-timeout": _key("federation", "round_timeout", _number(0.0, INF, True, True)),
    "node-wait-timeout": _key("federation", "node_wait_timeout", _number(0.0, INF, True, True)),
    "messages-in-flight": _key("federation", "messages_in_flight", _integer(0)),
    "max-failed-rounds": _key("federation", "max_failed_rounds", _integer(0)),
    "eval-every": _key("federation", "eval_every", _integer(1)),
    "data-dir": _key("data", "data_dir", _string()),
    "output-dir": _key("outputs", "output_dir", _string()),
    "checkpoint-every": _key("outputs", "checkpoint_every", _integer(0)),
    "resume": _key("outputs", "resume", _boolean()),
    "participant-state-dir": _key("outputs", "participant_state_dir", _string()),
}
"""Every run-config key, in pyproject.toml's order."""


# --------------------------------------------------------------------------- the typed config


@dataclass(frozen=True)
class RunConfig:
    """A resolved, validated run config: one frozen settings object per concern."""

    method: MethodSettings = field(default_factory=MethodSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    local: TrainSettings = field(default_factory=TrainSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    aggregation: AggregationRule = field(default_factory=AggregationRule)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    faults: FaultSettings = field(default_factory=FaultSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Defaults updated with ``overrides``, validated (:func:`resolve_config`), as typed settings."""
        resolved = resolve_config(overrides)
        return cls(**{name: section(resolved, name) for name in SECTIONS})

    @property
    def seed(self) -> int:
        """The run's seed (partitions, sampling, initial model, local training)."""
        return self.federation.seed

    def to_dict(self) -> dict[str, Any]:
        """The flat run config, key by key in :data:`KEYS` order."""
        out = {}
        for key, spec in KEYS.items():
            section_name, name = spec.targets[0]
            out[key] = spec.to_flat(getattr(getattr(self, section_name), name))
        return out

    def with_outputs(self, **changes: Any) -> RunConfig:
        """This config with fields of its :class:`OutputSettings` changed (where the run writes)."""
        return dataclasses.replace(self, outputs=dataclasses.replace(self.outputs, **changes))

    def fingerprint(self) -> str:
        """A short hash of what the run computes (not where, nor for how many rounds): tags participant state files."""
        text = json.dumps(run_identity(self.to_dict()), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def section(flat: Mapping[str, Any], name: str) -> Any:
    """Settings ``name`` (a :data:`SECTIONS` key) from the keys of ``flat`` that set it; absent keys keep their defaults.

    Values are converted to their field's scalar type (an int given for a float
    key becomes a float), not validated: validate with :func:`resolve_config`
    first when they come from a user (a train message carries values the server
    validated).
    """
    cls = SECTIONS[name]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {}
    for key, spec in KEYS.items():
        if key in flat:
            for section_name, field_name in spec.targets:
                if section_name == name:
                    values[field_name] = _coerce(spec.to_field(flat[key]), types[field_name])
    return cls(**values)


SCALARS: dict[str, type] = {"float": float, "int": int, "str": str, "bool": bool}
"""Annotations of settings fields whose values are converted to that type (an int given for a float key, ...)."""


def _coerce(value: Any, annotation: Any) -> Any:
    scalar = SCALARS.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))
    return scalar(value) if scalar else value


DEFAULTS: dict[str, Any] = RunConfig().to_dict()
"""Every key at its default: the keys and values of pyproject.toml's ``[tool.flwr.app.config]``."""
RULES: dict[str, Rule] = {key: spec.rule for key, spec in KEYS.items()}


# --------------------------------------------------------------------------- resolving


RENAMED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "classifier-scaler": ("output-scaling", lambda enabled: "scaler" if enabled else "none"),
}
"""Keys the app no longer has -> the key that replaced them and how an old value converts."""
MSFUSION_PAPER: dict[str, Any] = {"window-layout": "rolling", "block-count": 0, "shift-step": 1, "contrastive-weight": 1.0}
"""``msfusion`` as this project first read the paper, the default until issue 12's measurements: rolling
windows over the full model and the contrastive term (``conf/msfusion-paper.toml`` sets the same keys)."""
BEFORE_KEY: dict[str, Any] = {"output-scaling": "scaler", "window-layout": "rolling", "block-count": 0}
"""For keys whose default is not what the app did before they existed: the value that reproduces it."""


def with_defaults(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A config stored by an earlier run, in today's keys: renamed keys converted, keys added since then filled.

    A key added since counts as the value that reproduces the behaviour before
    it existed (:data:`BEFORE_KEY`), else as its default; so a finished run or a
    checkpoint from before a new key still counts as the same config when the
    key is left at that value.
    """
    current = dict(stored)
    for old, (new, convert) in RENAMED.items():
        if old in current:
            value = convert(current.pop(old))
            current.setdefault(new, value)
    return {**DEFAULTS, **BEFORE_KEY, **current}


IGNORED_ON_RESUME = ("resume", "output-dir", "torch-device", "participant-state-dir")
"""Config keys that may differ between a checkpointed run and the resumed one: where it runs, not what it
computes (the run to continue is the one in output-dir, however its path is spelled, and its folder may have
moved with its participants' state; it may continue on another device)."""

RUN_LENGTH = "num-server-rounds"
"""The key a resume may raise: a run continues past its checkpoint to the new length (never below it)."""


def run_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a run computes: its flat config without where it runs (:data:`IGNORED_ON_RESUME`) and for how many
    rounds (:data:`RUN_LENGTH`). A resume must match it; it tags participant state files."""
    return comparable(config, (*IGNORED_ON_RESUME, RUN_LENGTH))


def comparable(config: Mapping[str, Any], ignore: Iterable[str] = IGNORED_ON_RESUME) -> dict[str, Any]:
    """A flat config as JSON would store it, without the keys in ``ignore`` (by default those a resume may change)."""
    ignored = set(ignore)
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if k not in ignored}


def resolve_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults updated with ``overrides``, every key validated: the flat resolved mapping.

    Raises :class:`ConfigError` (one line naming the key) on an unknown key or
    a bad value, before anything else happens.
    """
    overrides = dict(overrides or {})
    for key in overrides:
        if key in RENAMED:
            new, convert = RENAMED[key]
            raise ConfigError(
                f"config key {key!r} was replaced by {new!r}: {key} = {overrides[key]!r} is {new} = {convert(overrides[key])!r}"
            )
        if key not in DEFAULTS:
            raise ConfigError(f"unknown config key {key!r}")
    config = {**DEFAULTS, **overrides}
    for key, (ok, expected) in RULES.items():
        if not ok(config[key]):
            raise ConfigError(f"config key {key!r} must be {expected}, got {config[key]!r}")
    if config["dropout-rate"] + config["straggler-rate"] >= 1.0:
        raise ConfigError(
            f"config key 'straggler-rate' plus dropout-rate must be below 1, got "
            f"{config['straggler-rate']} + {config['dropout-rate']}"
        )
    if config["attack-fraction"] > 0 and config["attack"] == "none":
        raise ConfigError(
            f"config key 'attack' must name an attack when attack-fraction > 0, got attack 'none' "
            f"with attack-fraction {config['attack-fraction']}"
        )
    _check_windows(config)
    if config["screen-updates"] and config["clip-updates"] == 0:
        raise ConfigError(
            "config key 'screen-updates' needs clip-updates > 0 (it compares directions: an unclipped outsized "
            "update would set the consensus the others are compared with), got clip-updates 0"
        )
    _check_privacy(config)
    _check_reference(config)
    _check_model_and_data(config)
    num_classes = NUM_CLASSES.get(config["dataset"], 0)
    if num_classes and config["classes-per-partition"] > num_classes:
        raise ConfigError(
            f"config key 'classes-per-partition' must be at most {num_classes} for "
            f"{config['dataset']}, got {config['classes-per-partition']}"
        )
    if config["method"] == "feddf" and config["server-data-fraction"] == 0:
        raise ConfigError(
            "config key 'server-data-fraction' must be > 0 for method 'feddf' "
            f"(its unlabeled distillation data), got {config['server-data-fraction']!r}"
        )
    if config["resume"] and not config["output-dir"]:
        raise ConfigError("config key 'resume' needs 'output-dir' set (the run to continue), got output-dir ''")
    return config


DP_REQUIRES = {"dp-clip": "> 0", "aggregation": "mean", "aggregation-weights": "equal", "clip-updates": 0.0, "screen-updates": False}
"""What a run with dp-noise-multiplier > 0 needs: clipped updates, an unweighted mean (example counts are
private), no clipping bound or screening taken from the round's updates (data-dependent)."""


def _check_privacy(config: Mapping[str, Any]) -> None:
    """Noise calibrated to the clipping bound needs the aggregation that the privacy analysis assumes."""
    if config["dp-noise-multiplier"] == 0:
        return
    for key, needed in DP_REQUIRES.items():
        ok = config[key] > 0 if needed == "> 0" else config[key] == needed
        if not ok:
            raise ConfigError(
                f"config key {key!r} must be {needed!r} with dp-noise-multiplier > 0 "
                f"(server/privacy.py says why), got {config[key]!r}"
            )


def _check_reference(config: Mapping[str, Any]) -> None:
    """Reference-scored aggregation trains references on the server slice and replaces weights and clipping."""
    if config["aggregation-weights"] != "reference":
        return
    if config["server-data-fraction"] == 0:
        raise ConfigError(
            "config key 'aggregation-weights' 'reference' needs server-data-fraction > 0 (the server's own clean "
            "examples it trains the references on), got server-data-fraction 0"
        )
    clashes = {"aggregation": config["aggregation"] != "mean", "clip-updates": config["clip-updates"] > 0,
               "screen-updates": config["screen-updates"], "method": config["method"] == "feddf"}  # fmt: skip
    for key, clash in clashes.items():
        if clash:
            raise ConfigError(
                f"config key 'aggregation-weights' 'reference' weights and rescales each update itself: it needs "
                f"aggregation 'mean', clip-updates 0, screen-updates false and a method other than feddf, got {key} {config[key]!r}"
            )


def _check_windows(config: Mapping[str, Any]) -> None:
    """MSfusion's window keys agree with each other. ``window-layout``, ``block-count`` and ``shift-step`` are
    msfusion's (other methods ignore them), and ``block-count`` is read only under the blocks layout."""
    _check_shared_groups(config)
    if config["method"] != "msfusion":
        return
    if config["window-layout"] == "blocks" and config["overlap"] != "auto":
        raise ConfigError(
            f"config key 'overlap' must be 'auto' with window-layout 'blocks' (blocks are disjoint; participants "
            f"holding the same block overlap fully; set window-layout 'rolling' for a fixed overlap), got {config['overlap']!r}"
        )
    if config["window-layout"] == "blocks":
        _check_block_count(config)


def _check_shared_groups(config: Mapping[str, Any]) -> None:
    """Shared groups are some, not all, of the model's width groups, under the blocks layout."""
    names = parse_names(config["shared-groups"])
    if not names:
        return
    if config["window-layout"] != "blocks" or config["method"] != "msfusion":
        raise ConfigError(
            f"config key 'shared-groups' needs method 'msfusion' with window-layout 'blocks', got method "
            f"{config['method']!r} with window-layout {config['window-layout']!r}"
        )
    groups = tuple(getattr(_model_class(config), "FULL_WIDTHS", {}))
    unknown = [name for name in names if name not in groups]
    if unknown or set(names) >= set(groups):
        raise ConfigError(
            f"config key 'shared-groups' must name some but not all of model {config['model']!r}'s width groups "
            f"({', '.join(groups)}), got {config['shared-groups']!r}"
        )


def _check_block_count(config: Mapping[str, Any]) -> None:
    """A block count fits the model: at most floor(K / w) blocks of w = round(r K) units in every width group
    that is cut into blocks (not ``shared-groups``)."""
    if not config["block-count"]:
        return
    shared = parse_names(config["shared-groups"])
    widths = {g: k for g, k in getattr(_model_class(config), "FULL_WIDTHS", {}).items() if g not in shared}
    ratio = MethodSettings(split_ratio=config["split-ratio"], budgets=parse_budgets(config["budgets"])).block_ratio
    fits = block_count(ratio, widths) if widths else 0
    if config["block-count"] > fits:
        raise ConfigError(
            f"config key 'block-count' must be at most {fits} (the blocks of split ratio {ratio:g} that fit model "
            f"{config['model']!r}; or window-layout 'rolling'), got {config['block-count']}"
        )


def _model_class(config: Mapping[str, Any]) -> type:
    """The run's model class; a model whose groups cannot be derived is a config error."""
    try:
        return model_class(config["model"])
    except ValueError as error:  # an unknown torchvision name, or a DerivationError
        raise ConfigError(f"config key 'model': {' '.join(str(error).split())}") from None


def _check_model_and_data(config: Mapping[str, Any]) -> None:
    """The model must read the dataset's kind of input; text takes text partitioners; a derived
    model has no Scaler to scale its outputs with."""
    dataset, text = config["dataset"], config["dataset"] in TEXT_DATASETS
    if is_derived_name(config["model"]) and config["output-scaling"] == "scaler":
        raise ConfigError(
            f"config key 'output-scaling' must be 'calibrated' or 'none' for model {config['model']!r} "
            "(derived models have no HeteroFL Scaler), got 'scaler'"
        )
    kind = _model_class(config).input_kind  # type: ignore[attr-defined]
    if kind != ("text" if text else "image"):
        fitting = [name for name, cls in MODELS.items() if cls.input_kind == ("text" if text else "image")]  # type: ignore[attr-defined]
        raise ConfigError(f"config key 'model' must be one of {fitting} for dataset {dataset!r}, got {config['model']!r}")
    allowed = TEXT_PARTITIONERS if text else tuple(p for p in PARTITIONERS if p != "contiguous")
    if config["partitioner"] not in allowed:
        raise ConfigError(f"config key 'partitioner' must be one of {list(allowed)} for dataset {dataset!r}, got {config['partitioner']!r}")
