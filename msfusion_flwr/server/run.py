"""One run on the server: build the global model and the strategy, run the rounds, write the outputs.

:func:`run_server` is what the ServerApp runs once the boundary
(:mod:`msfusion_flwr.apps`) has resolved the run config: the test set and the
initial model (seeded), the method's strategy (:mod:`.methods`), the round
loop (:mod:`.rounds`) with the global model evaluated every ``eval-every``
rounds, a metrics row per round (:mod:`.reporting`), and checkpoints every
``checkpoint-every`` rounds (:mod:`.checkpoint`).

Before the first round it waits (bounded) for ``min-available-nodes`` nodes,
learns their profiles and checks that the partitions they will load can be
made (:func:`~msfusion_flwr.data.check_partitions`), so that these mistakes
end the run at start with one line. A run in which no participant's update is
accepted for ``max-failed-rounds`` rounds in a row stops with the reasons.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from ..config import RunConfig
from ..data import DataUnavailableError, check_partitions, load_test_set, model_kwargs
from ..engine.coverage import Coverage, CoverageRound
from ..engine.groups import SplitSpec
from ..models import build_model
from ..models.evaluation import evaluate
from ..models.placement import resolve_device
from ..protocol import client_config
from .accounting import RoundTraffic, TrafficMeter
from .checkpoint import restore_rng_states, resume_state, save_checkpoint, warn_if_state_moved
from .methods import global_widths, make_strategy
from .nodes import wait_for_nodes
from .privacy import epsilon
from .reporting import RunReporter
from .rounds import run_rounds


def round_row(
    server_round: int,
    metrics: Mapping[str, float],
    traffic: RoundTraffic | None,
    wall_s: float,
    coverage: CoverageRound | None = None,
    dp_epsilon: float | None = None,
) -> dict[str, Any]:
    """One row of metrics.jsonl (``dp_epsilon``: the privacy spent so far, in runs with noise)."""
    traffic = traffic or RoundTraffic()
    covered = coverage or CoverageRound(0.0, 0.0, 0.0, {})
    return {
        "round": server_round,
        "accuracy": metrics.get("accuracy"),
        "loss": metrics.get("loss"),
        "perplexity": metrics.get("perplexity"),
        "participants": traffic.participants,
        "bytes_down": traffic.bytes_down,
        "bytes_up": traffic.bytes_up,
        "train_loss": None if math.isnan(traffic.train_loss) else traffic.train_loss,
        "failures": traffic.failures,
        "screened_out": traffic.screened,
        "per_participant": traffic.costs,
        "server_costs": traffic.server_costs,
        "coverage": covered.model,
        "coverage_round": covered.model_round,
        "coverage_split": covered.split,
        "coverage_by_tensor": covered.by_tensor,
        "dp_epsilon": dp_epsilon,
        "server_s": traffic.server_s,
        "wall_s": wall_s,
    }


class RunAborted(RuntimeError):
    """The run cannot go on; the message (one line) says why and what to change."""


@dataclass
class FailureWatch:
    """Counts rounds in a row in which participants were sampled but no update was accepted."""

    limit: int
    streak: list[int] = field(default_factory=list)

    def record(self, server_round: int, traffic: RoundTraffic | None) -> None:
        """Raise :class:`RunAborted` once ``limit`` rounds in a row had only failed replies."""
        if traffic is None or traffic.sampled == 0 or traffic.participants:
            self.streak = []
            return
        self.streak.append(server_round)
        if self.limit and len(self.streak) >= self.limit:
            reasons = Counter(reason.split(": ", 1)[-1] for reason in traffic.failures)
            summary = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(3))
            raise RunAborted(
                f"no participant's update was accepted in {len(self.streak)} rounds in a row (rounds "
                f"{self.streak[0]}-{self.streak[-1]}, max-failed-rounds {self.limit}); round {server_round}: {summary}"
            )


def preflight(grid: Grid, run: RunConfig, strategy: Any) -> None:
    """Before round 1: wait for the nodes, learn their profiles, check the partitions they will load.

    Where the server has the training data, a reply may then claim at most the
    run's training examples (``strategy.max_examples``).
    """
    federation = run.federation
    nodes = wait_for_nodes(grid, federation.min_available_nodes, federation.node_wait_timeout)
    strategy.nodes.learn(grid, nodes)
    counts = strategy.nodes.num_partitions()
    if len(counts) > 1:
        log(WARNING, "nodes report different num-partitions %s; checking each", sorted(counts))
    totals = []
    for num_partitions in sorted(counts):
        try:
            sizes = check_partitions(run.data, num_partitions)
        except DataUnavailableError as error:
            log(INFO, "partitions not checked (the server has no training data: %s)", error)
            return
        log(INFO, "%d partitions of %d training examples (smallest %d, largest %d)", num_partitions, sum(sizes), min(sizes), max(sizes))
        totals.append(sum(sizes))
    if totals:
        strategy.max_examples = max(totals)


def privacy_spent(run: RunConfig, population: int, rounds: int) -> float | None:
    """Epsilon at ``dp-delta`` after ``rounds`` rounds (:mod:`.privacy`); None in a run without noise."""
    privacy = run.privacy
    if not privacy.enabled:
        return None
    sampled = max(1, int(population * run.federation.fraction_train))
    value = epsilon(privacy.noise_multiplier, rounds, sampled, max(population, sampled), privacy.delta)
    if rounds == 0 or rounds == run.federation.num_server_rounds:
        log(INFO, "privacy after %d rounds: (epsilon %.3g, delta %g), noise multiplier %g, clip %g, %d of %d nodes per round",
            rounds, value, privacy.delta, privacy.noise_multiplier, privacy.clip, sampled, population)
    return value


def run_server(grid: Grid, run: RunConfig) -> Path:
    """Train for ``num-server-rounds`` rounds and write the run's outputs.

    With ``checkpoint-every`` > 0, writes a checkpoint every that many rounds and
    after the last; with ``resume`` and a checkpoint in ``output-dir``, continues
    after its round (to this config's ``num-server-rounds``, which may be larger).
    """
    checkpoint = resume_state(run)
    random.seed(run.seed)
    torch.manual_seed(run.seed)
    eval_device = resolve_device(run.local.device)
    test_set = load_test_set(run.data)
    global_model = build_model(run.model.name, global_widths(run), **model_kwargs(run.data))
    spec = SplitSpec.from_model(global_model)
    strategy = make_strategy(run, spec)
    preflight(grid, run, strategy)  # before anything is written: a mistake here loses nothing
    meter: TrafficMeter = strategy.meter
    coverage = Coverage(spec, global_model.state_dict())
    federation, outputs = run.federation, run.outputs
    first_round = 1
    if checkpoint is None:
        if outputs.resume:
            log(INFO, "resume: no checkpoint in %s, starting from scratch", outputs.output_dir)
        global_model.load_state_dict(strategy.initial_state(global_model.state_dict()))
        reporter = RunReporter(outputs.output_dir, run)
    else:
        first_round = int(checkpoint["round"]) + 1
        global_model.load_state_dict(checkpoint["global_model"])
        reporter = RunReporter(
            outputs.output_dir, run, resume_round=first_round - 1, cumulative_totals=checkpoint["cumulative_totals"]
        )
        restore_rng_states(checkpoint["rng"])
        warn_if_state_moved(checkpoint, run)
        coverage.load(checkpoint.get("coverage", {}))
        log(INFO, "resume: continuing %s after round %d", reporter.output_dir, first_round - 1)
    failures = FailureWatch(federation.max_failed_rounds)
    round_start = time.perf_counter()

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal round_start
        metrics: dict[str, float] = {}
        if server_round % federation.eval_every == 0 or server_round == federation.num_server_rounds:
            global_model.load_state_dict(arrays.to_torch_state_dict())
            metrics = evaluate(global_model, test_set, device=eval_device)
        traffic = meter.rounds.get(server_round)
        started = traffic.started if traffic else round_start
        covered = None
        if traffic is not None:
            full_model = [spec.full_plan()] if traffic.participants else []  # one full plan covers them all
            plans = traffic.plans if traffic.plans is not None else full_model
            covered = coverage.update(plans)
        spent = privacy_spent(run, len(strategy.profiles), server_round)
        reporter.record_round(round_row(server_round, metrics, traffic, time.perf_counter() - started, covered, spent))
        failures.record(server_round, traffic)
        round_start = time.perf_counter()
        return MetricRecord(metrics) if metrics else None

    def checkpoint_round(server_round: int, arrays: ArrayRecord) -> None:
        last = server_round == federation.num_server_rounds  # so that a finished run can be extended
        if outputs.checkpoint_every > 0 and (server_round % outputs.checkpoint_every == 0 or last):
            path = save_checkpoint(
                reporter.output_dir,
                server_round,
                arrays.to_torch_state_dict(),
                run,
                profiles=getattr(strategy, "profiles", None),
                cumulative_totals=reporter.cumulative.totals,
                coverage=coverage.state(),
            )
            log(INFO, "checkpoint after round %d: %s", server_round, path)

    final = run_rounds(
        strategy,
        grid,
        ArrayRecord(global_model.state_dict()),
        num_rounds=federation.num_server_rounds,
        timeout=federation.round_timeout,
        train_config=functools.partial(client_config, run),
        evaluate_fn=on_round_end,
        first_round=first_round,
        after_round=checkpoint_round,
        messages_in_flight=federation.messages_in_flight,
        on_server_work=meter.server_work,
    )
    reporter.save_model(final.to_torch_state_dict())
    reporter.plot_curves()
    return reporter.output_dir
