"""Run-config validation: every bad value is a one-line ConfigError naming its key."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msfusion_flwr.config import DEFAULTS, MSFUSION_PAPER, ConfigError, resolve_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
NAN, INF = math.nan, math.inf

BAD_VALUES: dict[str, list[object]] = {
    "method": ["fedprox", "MSFUSION", "", 1, None, True],
    "dataset": ["mnist", "", "Fashion-MNIST", 0, None],
    "model": ["resnet", "", 1, None],
    "num-server-rounds": [0, -1, 1.5, 20.0, True, "20", None],
    "fraction-train": [0, 0.0, -0.1, 1.01, NAN, INF, True, "1.0", None],
    "min-available-nodes": [0, -2, 2.0, True, "2"],
    "split-ratio": [0, 0.0, -0.25, 1.0000001, 2, NAN, INF, True, False, "0.25", None],
    "budgets": ["0.25;0.5", "0,0.5", "0.5,1.5", "a", "0.25,", ",", 0.25, None, True],
    "inter-participant-shift": [1, 0, "true", "yes", None],
    "window-layout": ["block", "Blocks", "", 0, None, True],
    "block-count": [-1, 1.5, 2.0, True, "2", None],
    "shared-groups": [1, None, True, "conv9", "conv1,conv2,conv3,fc"],
    "output-scaling": ["Calibrated", "", "true", True, 1, None],
    "fjord-levels": [0, -1, 8.0, True, "8"],
    "distill-steps": [0, -1, 50.0, 1.5, True, "50", None],
    "distill-batch-size": [0, -128, 128.0, True, "128", None],
    "distill-learning-rate": [0, 0.0, -0.001, INF, NAN, True, "0.001", None],
    "distill-temperature": [0, 0.0, -1.0, INF, NAN, True, "1.0", None],
    "overlap": [1.0, 1, 1.5, -0.1, NAN, -INF, True, False, "AUTO", "none", "0.5", "", None],
    "shift-step": [-1, 1.0, 0.5, True, False, "1", None],
    "contrastive-weight": [-0.1, -1, INF, NAN, True, "1.0", None],
    "contrastive-temperature": [0, 0.0, -0.5, INF, NAN, True, "0.5"],
    "codistill-weight": [-0.1, -1, INF, NAN, True, "1.0", None],
    "codistill-temperature": [0, 0.0, -0.5, INF, NAN, True, "1.0"],
    "local-epochs": [0, -1, 1.5, 1.0, True, "1"],
    "batch-size": [0, -32, 32.0, True, "32"],
    "learning-rate": [0, 0.0, -0.05, INF, NAN, True, "0.05"],
    "momentum": [1.0, 1, -0.1, 1.5, NAN, True, "0.9"],
    "weight-decay": [-0.0005, -1, INF, NAN, True, "0"],
    "learning-rate-schedule": ["Cosine", "linear", "", 0, None],
    "optimizer": ["Adam", "adamw", "", 0, None],
    "torch-device": ["gpu", "cuda:x", "", 0, None],
    "seq-len": [1, 0, -64, 64.0, "64", True, None],
    "train-split": ["test", "validation", "", 0, None],
    "vocab-size": [-1, 1, 1.5, "0", True, None],
    "partitioner": ["shard", "Dirichlet", "", 0, None],
    "dirichlet-alpha": [0, 0.0, -0.5, INF, NAN, True, "0.5"],
    "classes-per-partition": [0, -1, 11, 100, 2.0, True, "2"],
    "data-fraction": [0, 0.0, -0.5, 1.5, NAN, True, "1.0"],
    "test-examples": [-1, 1.5, "10", True, None],
    "server-data-fraction": [1.0, 1, -0.1, 1.5, NAN, INF, True, False, "0.1", None],
    "seed": [-1, 0.5, 1.0, True, False, "0", None],
    "dropout-rate": [-0.1, 1.0, 1, NAN, True, "0.2", None],
    "straggler-rate": [-0.1, 1.0, 1.5, NAN, True, "0.2", None],
    "attack": ["Scale", "signflip", "", 0, None, True],
    "attack-fraction": [-0.1, 1.01, NAN, INF, True, "0.2", None],
    "attack-scale": [0, 0.0, -1.0, INF, NAN, True, "10", None],
    "aggregation": ["fedmedian", "Median", "krum", "", 0, None],
    "trim-fraction": [-0.1, 0.5, 0.6, NAN, True, "0.2", None],
    "aggregation-weights": ["count", "Equal", "", 1, None],
    "weight-cap": [0.5, 0, -1.0, INF, NAN, True, "2", None],
    "clip-updates": [-0.1, -1, INF, NAN, True, "1.0", None],
    "screen-updates": [1, 0, "true", None],
    "dp-clip": [-0.1, -1, INF, NAN, True, "1.0", None],
    "dp-noise-multiplier": [-0.1, -1, INF, NAN, True, "1.0", None],
    "dp-delta": [0, 0.0, 1.0, 1, -1e-5, NAN, True, "1e-5", None],
    "round-timeout": [0, 0.0, -1, INF, NAN, True, "60"],
    "node-wait-timeout": [0, 0.0, -1, INF, NAN, True, "60", None],
    "messages-in-flight": [-1, 1.5, 8.0, True, "8", None],
    "max-failed-rounds": [-1, 1.5, 3.0, True, "3", None],
    "eval-every": [0, -1, 1.5, True, "1"],
    "data-dir": [0, 1.5, None, True, ["a"]],
    "output-dir": [0, None, False, ["out"]],
    "checkpoint-every": [-1, 1.5, 2.0, True, "1", None],
    "resume": [1, 0, "true", "yes", None],
    "participant-state-dir": [0, None, True, ["state"]],
}

CASES = [pytest.param(key, value, id=f"{key}={value!r}") for key, values in BAD_VALUES.items() for value in values]


def test_bad_values_cover_every_key():
    """The table of bad values lists every config key."""
    assert set(BAD_VALUES) == set(DEFAULTS)


@pytest.mark.parametrize(("key", "value"), CASES)
def test_bad_value_raises_one_line_error_naming_key(key, value):
    """An invalid value raises ConfigError whose single-line message names the key."""
    with pytest.raises(ConfigError) as info:
        resolve_config({key: value})
    message = str(info.value)
    assert f"'{key}'" in message
    assert "\n" not in message and "\r" not in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("key", ["rounds", "num_server_rounds", "Method", "", "split-ratio "])
def test_unknown_key_raises(key):
    """A key that is not in DEFAULTS raises a one-line ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        resolve_config({key: 1})
    assert repr(key) in str(info.value)
    assert "\n" not in str(info.value)


def test_defaults_resolve_to_themselves():
    """No overrides gives exactly DEFAULTS; resolving returns a new dict."""
    resolved = resolve_config()
    assert resolved == DEFAULTS
    assert resolved is not DEFAULTS
    assert resolve_config(None) == DEFAULTS


VALID_EDGES: list[tuple[str, object]] = [
    ("split-ratio", 1.0),
    ("split-ratio", 1),
    ("split-ratio", 1e-9),
    ("overlap", 0.0),
    ("overlap", 0),
    ("overlap", 0.99),
    ("overlap", "auto"),
    ("shift-step", 0),
    ("contrastive-weight", 0),
    ("contrastive-weight", 0.0),
    ("fraction-train", 1.0),
    ("data-fraction", 1.0),
    ("server-data-fraction", 0.0),
    ("server-data-fraction", 0),
    ("server-data-fraction", 0.99),
    ("distill-steps", 1),
    ("distill-batch-size", 1),
    ("distill-learning-rate", 1),
    ("distill-temperature", 1e-3),
    ("momentum", 0.0),
    ("weight-decay", 0),
    ("learning-rate", 1),
    ("classes-per-partition", 10),
    ("classes-per-partition", 1),
    ("seed", 0),
    ("seed", 2**40),
    ("num-server-rounds", 1),
    ("method", "fedavg"),
    ("method", "fedavg-small"),
    ("method", "heterofl"),
    ("method", "fedrolex"),
    ("method", "fd"),
    ("method", "fjord"),
    ("budgets", "0.25"),
    ("budgets", "0.125,0.25, 1"),
    ("inter-participant-shift", False),
    ("output-scaling", "none"),
    ("output-scaling", "scaler"),
    ("fjord-levels", 1),
    ("partitioner", "iid"),
    ("dropout-rate", 0.5),
    ("straggler-rate", 0.3),
    ("attack", "sign-flip"),
    ("attack-scale", 1e6),
    ("aggregation", "median"),
    ("aggregation", "trimmed-mean"),
    ("trim-fraction", 0.0),
    ("trim-fraction", 0.49),
    ("aggregation-weights", "equal"),
    ("aggregation-weights", "capped"),
    ("weight-cap", 1.0),
    ("clip-updates", 0.0),
    ("clip-updates", 1.5),
    ("dp-clip", 2.0),
    ("dp-delta", 0.01),
    ("round-timeout", 1),
    ("node-wait-timeout", 0.5),
    ("max-failed-rounds", 0),
    ("messages-in-flight", 8),
    ("partitioner", "pathological"),
    ("data-dir", "/tmp/somewhere"),
    ("output-dir", ""),
    ("checkpoint-every", 0),
    ("checkpoint-every", 1),
    ("resume", False),
    ("participant-state-dir", "/tmp/state"),
]


def rolling_for(key: str) -> dict[str, str]:
    """The rolling layout for keys whose whole range only it accepts: a fixed overlap, and split ratios above 1/2
    (where msfusion's default 2 disjoint blocks do not fit)."""
    return {"window-layout": "rolling"} if key in ("split-ratio", "overlap") else {}


@pytest.mark.parametrize(("key", "value"), VALID_EDGES, ids=[f"{k}={v!r}" for k, v in VALID_EDGES])
def test_valid_edge_values_pass(key, value):
    """Boundary values inside the documented ranges are accepted unchanged (see :func:`rolling_for`)."""
    extra = rolling_for(key)
    resolved = resolve_config({key: value, **extra})
    assert resolved[key] == value
    assert {k: v for k, v in resolved.items() if k != key} == {k: v for k, v in {**DEFAULTS, **extra}.items() if k != key}


def test_split_ratios_above_half_need_rolling_windows_or_one_block_for_msfusion_only():
    """Two disjoint blocks (msfusion's default) do not fit a split ratio above 1/2: a one-line error that names
    block-count and the way out; other methods ignore msfusion's window keys."""
    with pytest.raises(ConfigError, match="'block-count' must be at most 1 .*window-layout 'rolling'.*got 2") as info:
        resolve_config({"split-ratio": 0.75})
    assert "\n" not in str(info.value)
    assert resolve_config({"split-ratio": 0.75, "block-count": 1})["block-count"] == 1
    assert resolve_config({"split-ratio": 0.75, "window-layout": "rolling"})["split-ratio"] == 0.75
    for method in ("fedavg", "fedavg-small", "heterofl", "fedrolex", "fd", "fjord"):
        assert resolve_config({"split-ratio": 1.0, "method": method})["method"] == method


def test_pyproject_config_equals_defaults():
    """pyproject.toml's [tool.flwr.app.config] has exactly DEFAULTS' keys, values and value types."""
    with PYPROJECT.open("rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert list(table) == list(DEFAULTS)
    assert table == DEFAULTS
    for key, value in DEFAULTS.items():
        assert type(table[key]) is type(value), key


# Independent statement of the valid ranges: (kind, low, low inclusive, high, high inclusive).
RANGES = {
    "num-server-rounds": ("int", 1, True, None, False),
    "fjord-levels": ("int", 1, True, None, False),
    "min-available-nodes": ("int", 1, True, None, False),
    "shift-step": ("int", 0, True, None, False),
    "local-epochs": ("int", 1, True, None, False),
    "batch-size": ("int", 1, True, None, False),
    "classes-per-partition": ("int", 1, True, 10, True),
    "seed": ("int", 0, True, None, False),
    "eval-every": ("int", 1, True, None, False),
    "fraction-train": ("num", 0, False, 1, True),
    "split-ratio": ("num", 0, False, 1, True),
    "overlap": ("num", 0, True, 1, False),
    "contrastive-weight": ("num", 0, True, None, False),
    "contrastive-temperature": ("num", 0, False, None, False),
    "codistill-weight": ("num", 0, True, None, False),
    "codistill-temperature": ("num", 0, False, None, False),
    "learning-rate": ("num", 0, False, None, False),
    "momentum": ("num", 0, True, 1, False),
    "weight-decay": ("num", 0, True, None, False),
    "dirichlet-alpha": ("num", 0, False, None, False),
    "data-fraction": ("num", 0, False, 1, True),
    "server-data-fraction": ("num", 0, True, 1, False),
    "distill-steps": ("int", 1, True, None, False),
    "distill-batch-size": ("int", 1, True, None, False),
    "distill-learning-rate": ("num", 0, False, None, False),
    "distill-temperature": ("num", 0, False, None, False),
    "dropout-rate": ("num", 0, True, 1, False),
    "straggler-rate": ("num", 0, True, 1, False),
    "attack-scale": ("num", 0, False, None, False),
    "trim-fraction": ("num", 0, True, 0.5, False),
    "weight-cap": ("num", 1, True, None, False),
    "clip-updates": ("num", 0, True, None, False),
    "dp-clip": ("num", 0, True, None, False),
    "dp-delta": ("num", 0, False, 1, False),
    "round-timeout": ("num", 0, False, None, False),
    "node-wait-timeout": ("num", 0, False, None, False),
    "max-failed-rounds": ("int", 0, True, None, False),
    "checkpoint-every": ("int", 0, True, None, False),
}


def expected_valid(key: str, value: object) -> bool:
    kind, lo, lo_in, hi, hi_in = RANGES[key]
    if key == "overlap" and value == "auto":
        return True
    if type(value) is bool or not isinstance(value, (int, float)):
        return False
    if kind == "int" and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    if value < lo or (value == lo and not lo_in):
        return False
    if hi is not None and (value > hi or (value == hi and not hi_in)):
        return False
    return True


any_value = (
    st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=-2, max_value=2)
    | st.booleans()
    | st.text(max_size=6)
    | st.just("auto")
    | st.none()
)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(sorted(RANGES)), value=any_value)
def test_numeric_keys_accept_exactly_their_range(key, value):
    """For arbitrary values, a numeric key is accepted iff the value is in its documented range."""
    if expected_valid(key, value):
        assert resolve_config({key: value, **rolling_for(key)})[key] == value
    else:
        with pytest.raises(ConfigError) as info:
            resolve_config({key: value, **rolling_for(key)})
        assert f"'{key}'" in str(info.value) and "\n" not in str(info.value)


def test_dropout_and_straggler_rates_must_leave_someone_training():
    """dropout-rate + straggler-rate >= 1 is a one-line error naming straggler-rate."""
    with pytest.raises(ConfigError, match="'straggler-rate'") as info:
        resolve_config({"dropout-rate": 0.6, "straggler-rate": 0.4})
    assert "\n" not in str(info.value)
    assert resolve_config({"dropout-rate": 0.5, "straggler-rate": 0.4})["straggler-rate"] == 0.4


def test_block_windows_refuse_a_fixed_overlap_and_a_block_count_that_does_not_fit():
    """window-layout 'blocks' (msfusion's default) has disjoint blocks: a fixed overlap is a one-line error, and so
    is a block count that does not fit; other methods ignore msfusion's window keys, and the rolling layout ignores
    block-count."""
    with pytest.raises(ConfigError, match="'overlap'.*window-layout 'rolling'") as info:
        resolve_config({"overlap": 0.5})
    assert "\n" not in str(info.value)
    assert resolve_config({"overlap": 0.5, "window-layout": "rolling"})["overlap"] == 0.5
    assert resolve_config({"method": "fedrolex", "overlap": 0.5, "block-count": 9})["method"] == "fedrolex"
    assert resolve_config({"window-layout": "rolling", "block-count": 9})["block-count"] == 9
    assert resolve_config({"window-layout": "blocks", "shift-step": 0})["window-layout"] == "blocks"
    with pytest.raises(ConfigError, match="'block-count' must be at most 4 .*got 5") as info:
        resolve_config({"window-layout": "blocks", "block-count": 5})
    assert "\n" not in str(info.value)
    assert resolve_config({"window-layout": "blocks", "block-count": 16, "split-ratio": 0.0625})["block-count"] == 16
    for count in range(5):  # its range (not in RANGES: it needs window-layout 'blocks' and depends on the model)
        assert resolve_config({"window-layout": "blocks", "block-count": count})["block-count"] == count


def test_attackers_need_an_attack():
    """attack-fraction > 0 with attack 'none' is a one-line error naming 'attack'; with an attack, [0, 1] is accepted."""
    with pytest.raises(ConfigError, match="'attack'") as info:
        resolve_config({"attack-fraction": 0.2})
    assert "\n" not in str(info.value)
    for fraction in (0.0, 0.3, 1.0):
        assert resolve_config({"attack": "random", "attack-fraction": fraction})["attack-fraction"] == fraction
    assert resolve_config({"attack": "scale"})["attack-fraction"] == 0.0  # no attackers: a clean run of an attack matrix


def test_screening_needs_clipping():
    with pytest.raises(ConfigError, match="'screen-updates'") as info:
        resolve_config({"screen-updates": True})
    assert "\n" not in str(info.value)
    assert resolve_config({"screen-updates": True, "clip-updates": 1.0})["screen-updates"] is True


def test_resume_needs_an_output_dir():
    """resume = true without output-dir is a one-line error naming 'resume'; with one it is accepted."""
    with pytest.raises(ConfigError) as info:
        resolve_config({"resume": True})
    assert "'resume'" in str(info.value) and "\n" not in str(info.value)
    assert resolve_config({"resume": True, "output-dir": "out"})["resume"] is True


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"dataset": "wikitext-2"}, "model", "'transformer'"),  # default model is the CNN
        ({"model": "gpt2"}, "model", "'cnn'"),  # default dataset is Fashion-MNIST
        ({"dataset": "wikitext-2", "model": "transformer"}, "partitioner", "'contiguous'"),  # default is dirichlet
        ({"partitioner": "contiguous"}, "partitioner", "'pathological'"),
    ],
)
def test_model_dataset_and_partitioner_must_fit_together(overrides, key, fragment):
    """A text model on images, an image model on text, label partitioners on text: one line naming the key."""
    with pytest.raises(ConfigError) as info:
        resolve_config(overrides)
    message = str(info.value)
    assert "\n" not in message and f"'{key}'" in message and fragment in message


def test_language_model_configs_resolve():
    for model in ("transformer", "gpt2"):
        for partitioner in ("iid", "contiguous"):
            config = resolve_config({"dataset": "wikitext-2", "model": model, "partitioner": partitioner, "optimizer": "adam"})
            assert config["seq-len"] == 64 and config["train-split"] == "train"


def test_a_renamed_key_is_refused_with_its_replacement():
    """classifier-scaler became output-scaling: one line saying which value to use instead."""
    for old, new in ((True, "'scaler'"), (False, "'none'")):
        with pytest.raises(ConfigError) as info:
            resolve_config({"classifier-scaler": old})
        assert f"replaced by 'output-scaling': classifier-scaler = {old!r} is output-scaling = {new}" in str(info.value)


def test_the_paper_preset_is_msfusion_paper():
    """conf/msfusion-paper.toml sets exactly MSFUSION_PAPER's window and contrastive keys, and each differs from
    today's default (so the preset does change what runs)."""
    with (PYPROJECT.parent / "conf" / "msfusion-paper.toml").open("rb") as f:
        preset = tomllib.load(f)
    for key, value in MSFUSION_PAPER.items():
        assert preset[key] == value, key
    assert {key for key, value in MSFUSION_PAPER.items() if DEFAULTS[key] != value} == {"window-layout", "block-count", "contrastive-weight"}
    assert resolve_config(preset)["window-layout"] == "rolling"
