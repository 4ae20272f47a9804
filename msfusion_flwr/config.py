"""Run configuration: defaults, validation and the per-concern views of it.

The keys and defaults here are the single source of truth; pyproject.toml's
``[tool.flwr.app.config]`` lists the same (a test checks that they agree).
Validation happens once, at ServerApp start, before any training: a bad value
raises :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from .data import DATASETS, NUM_CLASSES, PARTITIONERS, TEXT_DATASETS, DataSettings
from .distillation import DistillSettings
from .models import MODELS
from .text_data import TEXT_PARTITIONERS
from .training import OPTIMIZERS

METHODS = ("msfusion", "fedavg", "fedavg-small", "heterofl", "fedrolex", "fd", "fjord", "feddf")
"""``fedavg`` is Flower's own FedAvg on the full model; the others run the
partial-training strategy with their index policy (see index_policies.py);
``feddf`` runs HeteroFL's participants and fuses by ensemble distillation on
the server slice (``server-data-fraction``, which it requires to be > 0)."""

DEFAULTS: dict[str, Any] = {
    "method": "msfusion",
    "dataset": "fashion-mnist",
    "model": "cnn",
    "num-server-rounds": 20,
    "fraction-train": 1.0,
    "min-available-nodes": 2,
    "split-ratio": 0.25,
    "budgets": "",
    "overlap": "auto",
    "shift-step": 1,
    "inter-participant-shift": True,
    "fjord-levels": 8,
    "distill-steps": 50,
    "distill-batch-size": 128,
    "distill-learning-rate": 0.001,
    "distill-temperature": 1.0,
    "contrastive-weight": 1.0,
    "contrastive-temperature": 0.5,
    "classifier-scaler": True,
    "local-epochs": 1,
    "batch-size": 32,
    "learning-rate": 0.05,
    "momentum": 0.9,
    "weight-decay": 0.0005,
    "optimizer": "sgd",
    "seq-len": 64,
    "train-split": "train",
    "vocab-size": 0,
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "classes-per-partition": 2,
    "data-fraction": 1.0,
    "server-data-fraction": 0.0,
    "seed": 0,
    "dropout-rate": 0.0,
    "straggler-rate": 0.0,
    "round-timeout": 3600.0,
    "eval-every": 1,
    "data-dir": "",
    "output-dir": "",
    "checkpoint-every": 0,
    "resume": False,
    "participant-state-dir": "",
}


class ConfigError(ValueError):
    """An invalid run-config value; the message is one line naming the key."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _choice(options: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), "one of " + ", ".join(repr(o) for o in options)


def _number(lo: float, hi: float, lo_open: bool, hi_open: bool) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return above and below

    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    return ok, f"a number in {left}{lo}, {hi}{right}"


def _integer(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= lo), f"an integer >= {lo}"


def _string() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, str)), "a string"


def _boolean() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, bool)), "true or false"


def parse_budgets(text: str) -> tuple[float, ...]:
    """``"0.25,0.5,1"`` -> (0.25, 0.5, 1.0); empty -> (). Raises ValueError."""
    if not text.strip():
        return ()
    ratios = tuple(float(part) for part in text.split(","))
    if not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(text)
    return ratios


def _budgets() -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        try:
            return isinstance(v, str) and parse_budgets(v) is not None
        except ValueError:
            return False

    return ok, "a comma-separated list of split ratios in (0, 1], or empty"


def _overlap() -> tuple[Callable[[Any], bool], str]:
    number_ok, _ = _number(0.0, 1.0, False, True)
    return (lambda v: v == "auto" or number_ok(v)), "'auto' or a number in [0, 1)"


INF = math.inf
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "method": _choice(METHODS),
    "dataset": _choice(DATASETS),
    "model": _choice(tuple(MODELS)),
    "num-server-rounds": _integer(1),
    "fraction-train": _number(0.0, 1.0, True, False),
    "min-available-nodes": _integer(1),
    "split-ratio": _number(0.0, 1.0, True, False),
    "budgets": _budgets(),
    "overlap": _overlap(),
    "shift-step": _integer(0),
    "inter-participant-shift": _boolean(),
    "classifier-scaler": _boolean(),
    "fjord-levels": _integer(1),
    "distill-steps": _integer(1),
    "distill-batch-size": _integer(1),
    "distill-learning-rate": _number(0.0, INF, True, True),
    "distill-temperature": _number(0.0, INF, True, True),
    "contrastive-weight": _number(0.0, INF, False, True),
    "contrastive-temperature": _number(0.0, INF, True, True),
    "local-epochs": _integer(1),
    "batch-size": _integer(1),
    "learning-rate": _number(0.0, INF, True, True),
    "momentum": _number(0.0, 1.0, False, True),
    "weight-decay": _number(0.0, INF, False, True),
    "optimizer": _choice(OPTIMIZERS),
    "seq-len": _integer(2),
    "train-split": _choice(("train", "valid")),
    "vocab-size": (lambda v: _is_int(v) and (v == 0 or v >= 2), "0 (every word) or an integer >= 2"),
    "partitioner": _choice(PARTITIONERS),
    "dirichlet-alpha": _number(0.0, INF, True, True),
    "classes-per-partition": _integer(1),
    "data-fraction": _number(0.0, 1.0, True, False),
    "server-data-fraction": _number(0.0, 1.0, False, True),
    "seed": _integer(0),
    "dropout-rate": _number(0.0, 1.0, False, True),
    "straggler-rate": _number(0.0, 1.0, False, True),
    "round-timeout": _number(0.0, INF, True, True),
    "eval-every": _integer(1),
    "data-dir": _string(),
    "output-dir": _string(),
    "checkpoint-every": _integer(0),
    "resume": _boolean(),
    "participant-state-dir": _string(),
}
assert RULES.keys() == DEFAULTS.keys()


def with_defaults(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A config stored by an earlier run, with every key added to the app since then at its default.

    Lets a finished run or a checkpoint from before a new key still count as
    the same config when the key is left at its default.
    """
    return {**DEFAULTS, **stored}


def resolve_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults updated with ``overrides``, every key validated.

    Raises :class:`ConfigError` (one line naming the key) on an unknown key or
    a bad value, before anything else happens.
    """
    overrides = dict(overrides or {})
    for key in overrides:
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


def _check_model_and_data(config: Mapping[str, Any]) -> None:
    """The model must read the dataset's kind of input; text takes text partitioners."""
    dataset, text = config["dataset"], config["dataset"] in TEXT_DATASETS
    kind = MODELS[config["model"]].input_kind  # type: ignore[attr-defined]
    if kind != ("text" if text else "image"):
        fitting = [name for name, cls in MODELS.items() if cls.input_kind == ("text" if text else "image")]  # type: ignore[attr-defined]
        raise ConfigError(f"config key 'model' must be one of {fitting} for dataset {dataset!r}, got {config['model']!r}")
    allowed = TEXT_PARTITIONERS if text else tuple(p for p in PARTITIONERS if p != "contiguous")
    if config["partitioner"] not in allowed:
        raise ConfigError(f"config key 'partitioner' must be one of {list(allowed)} for dataset {dataset!r}, got {config['partitioner']!r}")


def data_settings(config: Mapping[str, Any]) -> DataSettings:
    """The data view of a resolved config."""
    return DataSettings(
        dataset=str(config["dataset"]),
        data_dir=str(config["data-dir"]),
        partitioner=str(config["partitioner"]),
        dirichlet_alpha=float(config["dirichlet-alpha"]),
        classes_per_partition=int(config["classes-per-partition"]),
        data_fraction=float(config["data-fraction"]),
        seed=int(config["seed"]),
        server_fraction=float(config["server-data-fraction"]),
        seq_len=int(config["seq-len"]),
        train_split=str(config["train-split"]),
        vocab_size=int(config["vocab-size"]),
    )


def distill_settings(config: Mapping[str, Any]) -> DistillSettings:
    """The server-side distillation view of a resolved config (FedDF)."""
    return DistillSettings(
        steps=int(config["distill-steps"]),
        batch_size=int(config["distill-batch-size"]),
        learning_rate=float(config["distill-learning-rate"]),
        temperature=float(config["distill-temperature"]),
    )
