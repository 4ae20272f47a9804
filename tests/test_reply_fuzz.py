"""No reply crashes the server: generated replies against the real strategies' ``aggregate_train``.

Each participant's reply is honest or broken in one way (a metric missing,
non-finite, negative, fractional, a list, out of range or naming another
partition; an array of the wrong shape or dtype, NaN, missing or extra; an
error reply; a reply from a node that was never sampled). The server must
survive every combination, name every broken reply in the round's failures,
and end with exactly the model it computes from the honest replies alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from msfusion_flwr.config import RunConfig
from msfusion_flwr.engine import SplitSpec
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.models import build_model
from msfusion_flwr.protocol import ARRAYS, METRICS, client_config
from msfusion_flwr.server.methods import make_strategy
from msfusion_flwr.server.replies import TRAIN_METRICS, check_metrics

NODES = 3
MAX_EXAMPLES = 1000
WIDTHS = {"conv1": 4, "conv2": 8, "conv3": 8, "fc": 16}


def honest_metrics(partition_id: int) -> dict[str, float]:
    return {"num-examples": 40.0, "train-loss": 1.5, "train-ce": 1.4, "train-contrastive": 0.1, "train-codistill": 0.2, "train-steps": 2.0,
            "train-time-s": 0.2, "handler-time-s": 0.3, "trained-params": 900.0, "train-flops": 1e6, "peak-memory-bytes": 1e5,
            "partition-id": float(partition_id)}  # fmt: skip


BROKEN_METRICS = [
    *[("drop", key) for key, rule in TRAIN_METRICS.items() if rule.required],
    *[("set", key, value) for key in TRAIN_METRICS for value in (math.nan, math.inf, -math.inf, [1.0, 2.0])],
    *[("set", key, -1.0) for key, rule in TRAIN_METRICS.items() if rule.minimum >= 0],
    *[("set", key, 2.5) for key, rule in TRAIN_METRICS.items() if rule.integer],
    ("set", "num-examples", 0.0), ("set", "num-examples", 1e30), ("set", "num-examples", MAX_EXAMPLES + 1.0),
    ("set", "partition-id", float(NODES + 5)),
]  # fmt: skip
HARMLESS_METRICS = [("drop", key) for key, rule in TRAIN_METRICS.items() if not rule.required] + [
    ("set", "unknown-metric", math.nan),
    ("set", "unknown-metric", [1.0]),
    ("set", "num-examples", float(MAX_EXAMPLES)),
]
BROKEN_ARRAYS = ["shape", "dtype", "nan", "missing", "extra"]
BROKEN_REPLIES = ["error", "stranger"]


def apply_metric(metrics: dict, mutation: tuple) -> dict:
    metrics = dict(metrics)
    if mutation[0] == "drop":
        metrics.pop(mutation[1])
    else:
        metrics[mutation[1]] = mutation[2]
    return metrics


def apply_array(arrays: dict[str, np.ndarray], mutation: str) -> dict[str, np.ndarray]:
    arrays = dict(arrays)
    key = next(k for k, v in arrays.items() if v.ndim == 2)
    if mutation == "shape":
        arrays[key] = arrays[key][:-1]
    elif mutation == "dtype":
        arrays[key] = arrays[key].astype(np.float64)
    elif mutation == "nan":
        arrays[key] = arrays[key].copy()
        arrays[key].flat[0] = np.nan
    elif mutation == "missing":
        arrays.pop(key)
    elif mutation == "extra":
        arrays["backdoor"] = np.zeros(3, dtype=np.float32)
    return arrays


def reply_to(message: Message, arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}), METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=message)


def make_replies(messages: list[Message], kinds: list[tuple], seed: int) -> tuple[list[Message], int]:
    """One reply per message (honest updates: the slice plus seeded noise), broken as ``kinds`` says; the honest count."""
    rng = np.random.default_rng(seed)
    replies, honest = [], 0
    for message, (kind, mutation) in zip(messages, kinds):
        partition_id = message.metadata.dst_node_id  # LoopbackGrid: node id = partition id
        sent = {k: a.numpy() for k, a in message.content.array_records[ARRAYS].items()}
        arrays = {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in sent.items()}
        metrics = honest_metrics(partition_id)
        if kind == "metric":
            metrics = apply_metric(metrics, mutation)
        elif kind == "array":
            arrays = apply_array(arrays, mutation)
        if kind == "reply" and mutation == "error":
            replies.append(Message(Error(code=0, reason="ValueError: broken device"), reply_to=message))
        elif kind == "reply" and mutation == "stranger":
            stranger = Message(RecordDict(), dst_node_id=NODES + 7, message_type=MessageType.TRAIN)
            replies.append(reply_to(stranger, arrays, metrics))
        else:
            replies.append(reply_to(message, arrays, metrics))
        honest += kind in ("honest", "harmless")
    return replies, honest


reply_kind = st.one_of(
    st.just(("honest", None)),
    st.sampled_from(HARMLESS_METRICS).map(lambda m: ("harmless", m)),
    st.sampled_from(BROKEN_METRICS).map(lambda m: ("metric", m)),
    st.sampled_from(BROKEN_ARRAYS).map(lambda m: ("array", m)),
    st.sampled_from(BROKEN_REPLIES).map(lambda m: ("reply", m)),
)


def configured(method: str):
    """A strategy after configure_train of round 1 on NODES loopback nodes; its messages and the global state."""
    config = RunConfig.from_mapping({"method": method, "split-ratio": 0.5, "min-available-nodes": NODES})
    torch.manual_seed(0)
    model = build_model("cnn", WIDTHS)
    strategy = make_strategy(config, SplitSpec.from_model(model))
    strategy.max_examples = MAX_EXAMPLES
    grid = LoopbackGrid(NODES)
    strategy.nodes.learn(grid, grid.get_node_ids())
    arrays = ArrayRecord(model.state_dict())
    messages = sorted(strategy.configure_train(1, arrays, client_config(config), grid), key=lambda m: m.metadata.dst_node_id)
    return strategy, messages, arrays


@pytest.mark.parametrize("method", ["msfusion", "fedavg"])
@settings(max_examples=40, deadline=None)
@given(kinds=st.lists(reply_kind, min_size=NODES, max_size=NODES), seed=st.integers(0, 2**16))
def test_the_server_survives_every_reply_and_only_honest_ones_change_the_model(method, kinds, seed):
    strategy, messages, arrays = configured(method)
    replies, honest = make_replies(messages, kinds, seed)
    merged, _ = strategy.aggregate_train(1, replies)
    traffic = strategy.meter.rounds[1]
    strangers = sum(m == "stranger" for _, m in kinds)
    assert len(traffic.participants) == honest
    assert len(traffic.failures) == NODES - honest + strangers  # a stranger's reply, and no reply from the node it replaced
    assert all("\n" not in reason for reason in traffic.failures)
    reference, messages_ref, _ = configured(method)
    kept = [r for r, (k, _) in zip(make_replies(messages_ref, kinds, seed)[0], kinds) if k in ("honest", "harmless")]
    expected, _ = reference.aggregate_train(1, kept)
    if honest == 0:
        assert merged is None and expected is None
        return
    for key, tensor in expected.to_torch_state_dict().items():
        got = merged.to_torch_state_dict()[key]
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, tensor, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(merged.to_torch_state_dict().values(), arrays.to_torch_state_dict().values()))


def test_every_broken_metric_is_named_in_one_line():
    """Each broken metric of the generator is refused with a reason naming the metric or the bound."""
    for mutation in BROKEN_METRICS:
        reason = check_metrics(MetricRecord(apply_metric(honest_metrics(1), mutation)), partition_id=1, max_examples=MAX_EXAMPLES)
        assert reason is not None and "\n" not in reason, mutation
        assert mutation[1] in reason or "partition-id" in reason, (mutation, reason)
    for mutation in HARMLESS_METRICS:
        assert check_metrics(MetricRecord(apply_metric(honest_metrics(1), mutation)), 1, MAX_EXAMPLES) is None, mutation
