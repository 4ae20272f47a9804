"""Replies fused as they arrive (server/folding.py, server/rounds.py: receive_each) against today's aggregate.

The server folds each accepted update into running sums, in rank order, as
soon as every lower rank has been resolved. Whatever the order replies arrive
in, and whether they arrive one by one or in one list, the fused model must be
exactly (bit for bit) what the engine's ``aggregate`` makes of the accepted
updates in rank order, and a fold fed in rank order must hold no update.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reply_fuzz import WIDTHS, honest_metrics, reply_to

from msfusion_flwr.config import ConfigError, RunConfig
from msfusion_flwr.engine import SplitSpec, SubmodelUpdate, aggregate
from msfusion_flwr.experiments.loopback import LoopbackGrid
from msfusion_flwr.models import build_model
from msfusion_flwr.protocol import ARRAYS, client_config
from msfusion_flwr.server.methods import make_strategy
from msfusion_flwr.server.rounds import receive_each, run_rounds

NODES = 6
RULES = {  # run-config keys -> a rule that streams or one that needs the whole round
    "mean": {},
    "equal-weights": {"aggregation-weights": "equal"},
    "median": {"aggregation": "median"},
    "clip": {"clip-updates": 1.0},
}


def planned(overrides: dict):
    """A strategy after configure_train of round 1 on NODES loopback nodes, its messages and the global state."""
    config = RunConfig.from_mapping({"method": "msfusion", "split-ratio": 0.5, "min-available-nodes": NODES, **overrides})
    torch.manual_seed(0)
    model = build_model("cnn", WIDTHS)
    strategy = make_strategy(config, SplitSpec.from_model(model))
    grid = LoopbackGrid(NODES)
    strategy.nodes.learn(grid, grid.get_node_ids())
    messages = list(strategy.configure_train(1, ArrayRecord(model.state_dict()), client_config(config), grid))
    return strategy, messages, model.state_dict()


def replies_to(messages: list[Message], seed: int) -> list[Message]:
    """Honest replies (the slice plus seeded noise), with different example counts."""
    rng = np.random.default_rng(seed)
    replies = []
    for message in messages:
        node = message.metadata.dst_node_id
        sent = {k: a.numpy() for k, a in message.content.array_records[ARRAYS].items()}
        arrays = {k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in sent.items()}
        replies.append(reply_to(message, arrays, honest_metrics(node) | {"num-examples": float(10 + 7 * node)}))
    return replies


def todays_aggregate(strategy, messages, replies, global_state) -> dict[str, torch.Tensor]:
    """The engine's aggregate of the replies in rank order (partition id = node id here)."""
    plans = {m.metadata.dst_node_id: strategy._plans[m.metadata.dst_node_id] for m in messages}
    ordered = sorted(replies, key=lambda r: r.metadata.src_node_id)
    updates = [
        SubmodelUpdate(plans[r.metadata.src_node_id], r.content[ARRAYS].to_torch_state_dict(), float(10 + 7 * r.metadata.src_node_id))
        for r in ordered
    ]
    return aggregate(global_state, strategy.spec, updates, strategy.calibrate, strategy.rule)


def assert_same(merged: ArrayRecord, expected: dict[str, torch.Tensor]) -> None:
    state = merged.to_torch_state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


@pytest.mark.parametrize("rule", sorted(RULES))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), one_by_one=st.booleans())
def test_any_arrival_order_fuses_to_todays_aggregate_bit_for_bit(rule, seed, one_by_one):
    strategy, messages, global_state = planned(RULES[rule])
    assert strategy.calibrate  # output-scaling = "calibrated" (the default): calibration is part of what is compared
    replies = replies_to(messages, seed)
    expected = todays_aggregate(strategy, messages, replies, global_state)
    random.Random(seed).shuffle(replies)
    if one_by_one:
        for reply in replies:
            strategy.receive_train(1, reply)
        merged, metrics = strategy.aggregate_train(1, [])
    else:
        merged, metrics = strategy.aggregate_train(1, replies)
    assert_same(merged, expected)
    assert strategy.meter.rounds[1].participants == list(range(NODES))
    assert metrics is not None and strategy.meter.rounds[1].bytes_up > 0


def test_a_streaming_fold_holds_only_the_updates_that_arrive_ahead_of_a_lower_rank():
    strategy, messages, global_state = planned({})
    replies = sorted(replies_to(messages, 1), key=lambda r: r.metadata.src_node_id)
    fold = strategy._fold
    assert fold.running is not None
    for reply in replies[2:]:  # every rank but the first two: all held, since rank 0 is not resolved
        strategy.receive_train(1, reply)
    assert len(fold.held) == NODES - 2
    strategy.receive_train(1, replies[0])  # rank 0 in: folded, rank 1 still missing
    assert len(fold.held) == NODES - 2 and fold.running.count == 1
    strategy.receive_train(1, replies[1])  # now every held update follows in rank order
    assert len(fold.held) == 0 and fold.running.count == NODES
    merged, _ = strategy.aggregate_train(1, [])
    assert_same(merged, todays_aggregate(strategy, messages, replies, global_state))


def test_a_rule_that_needs_the_whole_round_holds_every_update_until_the_end():
    strategy, messages, _ = planned(RULES["median"])
    for reply in sorted(replies_to(messages, 2), key=lambda r: r.metadata.src_node_id):
        strategy.receive_train(1, reply)
    assert strategy._fold.running is None and len(strategy._fold.held) == NODES


def test_a_missing_reply_and_a_broken_one_are_left_out_and_the_rest_still_fold():
    strategy, messages, global_state = planned({})
    replies = replies_to(messages, 3)
    broken = replies[1]
    broken.content[ARRAYS] = ArrayRecord({k: v for k, v in broken.content[ARRAYS].to_torch_state_dict().items() if k != "fc.bias"})
    kept = [replies[0], *replies[2:-1]]  # the last node never replies
    for reply in [replies[0], broken, *replies[2:-1]]:
        strategy.receive_train(1, reply)
    merged, _ = strategy.aggregate_train(1, [])
    traffic = strategy.meter.rounds[1]
    assert [f.split(":")[0] for f in traffic.failures] == ["partition 1 (node 1)", f"partition {NODES - 1} (node {NODES - 1})"]
    assert "no reply" in traffic.failures[1]
    assert_same(merged, todays_aggregate(strategy, messages, kept, global_state))


def test_a_second_reply_from_a_node_is_left_out():
    strategy, messages, global_state = planned({})
    replies = replies_to(messages, 4)
    for reply in [*replies, replies_to(messages, 5)[0]]:
        strategy.receive_train(1, reply)
    merged, _ = strategy.aggregate_train(1, [])
    assert strategy.meter.rounds[1].failures == ["partition 0 (node 0): a second reply in this round"]
    assert_same(merged, todays_aggregate(strategy, messages, replies, global_state))


class TrickleGrid:
    """Answers pushed messages a few at a time, in reverse order, one batch per pull; never answers the ``silent`` nodes."""

    def __init__(self, replies: dict[int, Message], batch: int, silent: Collection[int] = frozenset({0})) -> None:
        self.replies, self.batch, self.silent, self.pending, self.pulls = replies, batch, silent, [], 0

    def push_messages(self, messages):
        self.pending = sorted((m for m in messages if m.metadata.dst_node_id not in self.silent), key=lambda m: -m.metadata.dst_node_id)
        return [f"id-{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        out, self.pending = self.pending[: self.batch], self.pending[self.batch :]
        answered = []
        for message in out:
            reply = self.replies[message.metadata.dst_node_id]
            reply.metadata.__dict__["_reply_to_message_id"] = f"id-{message.metadata.dst_node_id}"
            answered.append(reply)
        return answered


def test_receive_each_hands_over_each_reply_as_it_is_pulled_and_stops_at_the_timeout():
    _, messages, _ = planned({})
    replies = {r.metadata.src_node_id: r for r in replies_to(messages, 6)}
    grid = TrickleGrid(replies, batch=2)
    seen: list[tuple[int, int]] = []
    start = time.time()
    receive_each(grid, messages, timeout=1.0, on_reply=lambda r: seen.append((grid.pulls, r.metadata.src_node_id)))
    assert seen == [(1, 5), (1, 4), (2, 3), (2, 2), (3, 1)]  # as pulled, node 0 never
    assert 1.0 <= time.time() - start < 3.0  # waited for node 0 until the timeout, no longer


def test_receive_each_without_a_timeout_waits_for_every_reply():
    _, messages, _ = planned({})
    replies = {r.metadata.src_node_id: r for r in replies_to(messages, 7)}
    seen: list[int] = []
    receive_each(TrickleGrid(replies, batch=4, silent=set()), messages, timeout=None, on_reply=lambda r: seen.append(r.metadata.src_node_id))
    assert seen == [5, 4, 3, 2, 1, 0]


def answer(message: Message, seed: int) -> Message:
    """An honest reply to ``message``, the same whenever it is made: the slice plus noise seeded by (seed, node)."""
    node = message.metadata.dst_node_id
    rng = np.random.default_rng([seed, node])
    sent = {k: a.numpy() for k, a in message.content.array_records[ARRAYS].items()}
    arrays = {k: (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype) for k, v in sent.items()}
    return reply_to(message, arrays, honest_metrics(node) | {"num-examples": float(10 + 7 * node)})


class WaveGrid(LoopbackGrid):
    """Loopback nodes that answer pushed train messages in push order, ``batch`` per pull (never the ``silent``
    ones); records, at every push, how many messages were pushed and not answered, and how many the strategy had
    built (``built``: a callable), to show that messages are built only as they are pushed."""

    def __init__(self, batch: int, built=lambda: 0, silent: Collection[int] = frozenset(), seed: int = 0) -> None:
        super().__init__(NODES)
        self.batch, self.built, self.silent, self.seed = batch, built, silent, seed
        self.queue: list[Message] = []
        self.unanswered = 0
        self.pushes: list[tuple[int, int, int]] = []  # (messages in this push, unanswered after it, built by then)
        self.pushed_nodes: list[int] = []

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            message.metadata.__dict__["_message_id"] = f"id-{message.metadata.dst_node_id}"
            self.pushed_nodes.append(message.metadata.dst_node_id)
            if message.metadata.dst_node_id not in self.silent:
                self.queue.append(message)
        self.unanswered += len(messages)
        self.pushes.append((len(messages), self.unanswered, self.built()))
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        out, self.queue = self.queue[: self.batch], self.queue[self.batch :]
        self.unanswered -= len(out)
        return [answer(m, self.seed) for m in out]


def run_with(overrides: dict, in_flight: int, rounds: int = 2) -> tuple[dict[str, torch.Tensor], WaveGrid, object]:
    """``rounds`` rounds of the real round loop against a WaveGrid; the final global state, the grid, the strategy."""
    config = RunConfig.from_mapping({"method": "msfusion", "split-ratio": 0.5, "min-available-nodes": NODES, **overrides})
    torch.manual_seed(0)
    model = build_model("cnn", WIDTHS)
    strategy = make_strategy(config, SplitSpec.from_model(model))
    grid = WaveGrid(batch=1, built=lambda: len(strategy._expected))
    final = run_rounds(strategy, grid, ArrayRecord(model.state_dict()), rounds, timeout=60.0,
                       train_config=client_config(config), messages_in_flight=in_flight)  # fmt: skip
    return final.to_torch_state_dict(), grid, strategy


@pytest.mark.parametrize("rule", ["mean", "median"])
def test_messages_in_flight_bounds_what_is_pushed_and_unanswered_and_changes_nothing_else(rule):
    at_once, grid_at_once, strategy_at_once = run_with(RULES[rule], in_flight=0)
    in_waves, grid, strategy = run_with(RULES[rule], in_flight=2)
    assert_same(ArrayRecord(in_waves), at_once)
    assert max(unanswered for _, unanswered, _ in grid.pushes) == 2
    assert max(unanswered for _, unanswered, _ in grid_at_once.pushes) == NODES
    assert grid.pushed_nodes == grid_at_once.pushed_nodes == list(range(NODES)) * 2  # rank order, every round
    pushed = 0
    for count, _, built in grid.pushes:  # a message is sliced only when it is taken to be pushed
        pushed += count
        assert built == (pushed - 1) % NODES + 1
    for round_ in (1, 2):
        assert strategy.meter.rounds[round_].bytes_down == strategy_at_once.meter.rounds[round_].bytes_down > 0
        assert strategy.meter.rounds[round_].participants == list(range(NODES))


@pytest.mark.parametrize(
    "silent, pushed, replied",
    [
        ({1}, list(range(NODES)), [0, 2, 3, 4, 5]),  # node 1 holds one slot until the timeout; the other serves the rest
        ({0, 1}, [0, 1], []),  # both slots held: nodes 2.. are never sent their message
    ],
)
def test_messages_in_waves_stop_at_the_timeout_and_what_was_not_sent_counts_as_no_reply(silent, pushed, replied):
    strategy, _, _ = planned({})
    config = RunConfig.from_mapping({"method": "msfusion", "split-ratio": 0.5, "min-available-nodes": NODES})
    grid = WaveGrid(batch=1, silent=silent)
    messages = strategy.train_messages(1, ArrayRecord(build_model("cnn", WIDTHS).state_dict()), client_config(config), grid)
    start = time.time()
    receive_each(grid, messages, timeout=0.5, on_reply=lambda r: strategy.receive_train(1, r), in_flight=2)
    assert 0.5 <= time.time() - start < 2.5
    assert grid.pushed_nodes == pushed
    strategy.aggregate_train(1, [])
    traffic = strategy.meter.rounds[1]
    assert traffic.participants == replied and traffic.sampled == NODES
    assert len(traffic.failures) == NODES - len(replied) and all("no reply" in f for f in traffic.failures)
    assert set(traffic.sent_bytes) == set(pushed)  # bytes down count the messages sent, not the ones planned


def test_messages_in_flight_with_flowers_fedavg_is_a_one_line_error():
    config = RunConfig.from_mapping({"method": "fedavg", "messages-in-flight": 4})
    with pytest.raises(ConfigError, match="messages-in-flight.*Flower's FedAvg"):
        make_strategy(config, SplitSpec.from_model(build_model("cnn", WIDTHS)))
