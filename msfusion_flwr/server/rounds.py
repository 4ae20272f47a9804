"""The server's round loop: Flower's ``Strategy.start``, able to begin at any round.

Same steps, in the same order, as ``flwr.serverapp.strategy.Strategy.start``
(configure_train -> send_and_receive -> aggregate_train -> configure_evaluate
-> send_and_receive -> aggregate_evaluate -> centralized evaluation), calling
only the strategy's public methods, so it drives Flower's FedAvg unchanged as
well as our strategies. Three additions: ``first_round`` (a resumed run starts
after its checkpoint's round, and skips the initial evaluation),
``after_round``, called once a round is complete (the checkpoint hook), and,
for a strategy with ``receive_train(server_round, reply)``, train replies handed
to it one by one as they are pulled (:func:`receive_each`) instead of held in
one list until the last arrives; with ``messages_in_flight``, its train
messages pushed in waves, each built (``train_messages``, where the strategy
has it) only when a slot frees up.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from logging import INFO
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log

T = TypeVar("T")


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord | Callable[[int], ConfigRecord] | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    first_round: int = 1,
    after_round: Callable[[int, ArrayRecord], None] | None = None,
    messages_in_flight: int = 0,
    on_server_work: Callable[[int, float], None] | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds`` from global ``arrays``; return the final global arrays.

    ``messages_in_flight`` > 0 bounds the train messages awaiting a reply at
    any time (:func:`receive_each`) for a strategy with ``receive_train``; 0
    pushes a round's messages all at once, as Flower does. ``on_server_work``
    gets, after each round's ``aggregate_train``, the seconds spent in the
    strategy's train methods (planning, slicing each message, checking and
    fusing replies; not the waiting). ``train_config`` may be a function of the
    round (a learning-rate schedule).
    """
    log(INFO, "Starting %s strategy:", strategy.__class__.__name__)
    config_of = train_config if callable(train_config) else lambda _round: train_config or ConfigRecord()
    log_strategy_start_info(num_rounds, arrays, config_of(first_round), evaluate_config)
    strategy.summary()
    log(INFO, "")
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    t_start = time.time()

    if first_round == 1 and evaluate_fn:
        res = evaluate_fn(0, arrays)
        log(INFO, "Initial global evaluation results: %s", res)
    elif first_round > 1:
        log(INFO, "Resuming at round %d", first_round)

    for current_round in range(first_round, num_rounds + 1):
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", current_round, num_rounds)

        work = Stopwatch()
        receive = getattr(strategy, "receive_train", None)
        train_config = config_of(current_round)
        if receive is None:
            train_messages = work.call(strategy.configure_train, current_round, arrays, train_config, grid)
            train_replies = grid.send_and_receive(messages=train_messages, timeout=timeout)
            del train_messages
        else:
            configure = getattr(strategy, "train_messages", strategy.configure_train)
            train_messages = work.each(work.call(configure, current_round, arrays, train_config, grid))
            on_reply = functools.partial(work.call, receive, current_round)
            receive_each(grid, train_messages, timeout, on_reply, messages_in_flight)
            train_replies = []
            del train_messages
        agg_arrays, agg_train_metrics = work.call(strategy.aggregate_train, current_round, train_replies)
        if on_server_work:
            on_server_work(current_round, work.seconds)
        if agg_arrays is not None:
            arrays = agg_arrays
        if agg_train_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_train_metrics)

        evaluate_replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(current_round, arrays, evaluate_config, grid),
            timeout=timeout,
        )
        agg_evaluate_metrics = strategy.aggregate_evaluate(current_round, evaluate_replies)
        if agg_evaluate_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_evaluate_metrics)

        if evaluate_fn:
            log(INFO, "Global evaluation")
            res = evaluate_fn(current_round, arrays)
            log(INFO, "\t└──> MetricRecord: %s", res)
        if after_round:
            after_round(current_round, arrays)

    log(INFO, "")
    log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
    return arrays


@dataclass
class Stopwatch:
    """Adds up the wall time spent in the calls (and iterator steps) it runs."""

    seconds: float = 0.0

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)``, timed."""
        start = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.seconds += time.perf_counter() - start

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """The items of ``items``, the time taken to produce each one timed (a lazy iterable's work)."""
        iterator = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield item


PULL_INTERVAL = 0.1
"""Seconds between two pulls for replies (Flower's in-memory Grid waits as long between its own)."""


def receive_each(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    on_reply: Callable[[Message], None],
    in_flight: int = 0,
) -> None:
    """``Grid.send_and_receive``, but each reply goes to ``on_reply`` as soon as a pull returns it.

    Pushes ``messages``, then pulls the replies to them until every one has
    arrived or ``timeout`` seconds have passed (None: no limit), as Flower's own
    loop does; the replies are not kept here. With ``in_flight`` > 0, at most
    that many messages await a reply at a time: the rest are taken from
    ``messages`` (which may build each one only then) and pushed as replies
    free their slots, within the same ``timeout``; a message still untaken at
    the timeout is never sent. A message the grid could not push (no id) is
    not waited for.
    """
    queue = iter(messages)
    pending: set[str] = set()

    def top_up() -> None:
        while in_flight <= 0 or len(pending) < in_flight:
            batch = list(queue) if in_flight <= 0 else list(itertools.islice(queue, in_flight - len(pending)))
            if not batch:
                return
            pending.update(i for i in grid.push_messages(batch) if i)
            if in_flight <= 0:
                return

    deadline = math.inf if timeout is None else time.time() + timeout
    top_up()
    while pending:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            on_reply(reply)
        if time.time() >= deadline:
            return
        top_up()
        if not pending:
            return
        time.sleep(PULL_INTERVAL)
