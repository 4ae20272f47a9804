"""Flower apps and the one function that runs a federation from a config mapping.

``make_server_app(overrides)`` / ``make_client_app()`` build the apps that
``flwr run`` loads (through ``server_app.py`` / ``client_app.py``) and that
:func:`run_experiment` hands to Flower's in-process ``run_simulation``, which
passes no run config: there, the config mapping comes in as ``overrides``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from torch.utils.data import Dataset

from . import participant
from .checkpoint import restore_rng_states, resume_state, run_fingerprint, save_checkpoint
from .config import ConfigError, data_settings, distill_settings, parse_budgets, resolve_config
from .data import load_server_set, load_test_set, model_kwargs
from .index_policies import (
    DoubleShift,
    FullWidth,
    IndexPolicy,
    OrderedDropout,
    RandomSubset,
    RollingWindow,
    StaticPrefix,
    window_length,
)
from .models import build_model, model_class
from .protocol import client_config
from .reporting import RunReporter, default_output_dir
from .rounds import run_rounds
from .splitting import SplitSpec
from .strategy import Budgets, EnsembleDistillation, MeteredFedAvg, RoundTraffic, SubmodelStrategy, TrafficMeter
from .training import evaluate


POLICIES: dict[str, Callable[[Mapping[str, Any]], IndexPolicy]] = {
    "msfusion": lambda c: DoubleShift(
        shift_step=int(c["shift-step"]),
        overlap=c["overlap"],
        inter_participant=bool(c["inter-participant-shift"]),
    ),
    "heterofl": lambda c: StaticPrefix(),
    "fedrolex": lambda c: RollingWindow(),
    "fd": lambda c: RandomSubset(),
    "fjord": lambda c: OrderedDropout(levels=int(c["fjord-levels"])),
    "fedavg-small": lambda c: FullWidth(),
}
"""Partial-training methods: the index policy each one runs over the engine."""

DISTILLATION_METHODS: dict[str, str] = {"feddf": "heterofl"}
"""Methods that fuse by ensemble distillation on the server slice (``server-data-fraction``),
and the partial-training method (:data:`POLICIES`) whose participants they run:
FedDF with heterogeneous widths trains HeteroFL's static-prefix sub-models."""


def global_widths(config: Mapping[str, Any]) -> dict[str, int] | None:
    """Widths of the global model: full, except for ``fedavg-small`` whose global model is the narrow one."""
    if config["method"] != "fedavg-small":
        return None
    full = model_class(str(config["model"])).FULL_WIDTHS  # type: ignore[attr-defined]
    return {name: window_length(float(config["split-ratio"]), k) for name, k in full.items()}


def make_strategy(
    config: Mapping[str, Any], spec: SplitSpec, server_set: Dataset | None = None
) -> SubmodelStrategy | MeteredFedAvg:
    """The strategy named by ``method``: Flower's FedAvg, or the engine with that method's policy.

    Distillation methods (``feddf``) also get the server set: ``server_set``,
    or else the run's server slice (:func:`~msfusion_flwr.data.load_server_set`).
    """
    method = str(config["method"])
    if method == "fedavg":
        return MeteredFedAvg(
            fraction_train=float(config["fraction-train"]),
            min_train_nodes=1,
            min_available_nodes=int(config["min-available-nodes"]),
        )
    policy = POLICIES[DISTILLATION_METHODS.get(method, method)](config)
    budgets = Budgets(float(config["split-ratio"]), parse_budgets(str(config["budgets"])))
    options: dict[str, Any] = {
        "fraction_train": float(config["fraction-train"]),
        "min_available_nodes": int(config["min-available-nodes"]),
        "seed": int(config["seed"]),
        "query_timeout": float(config["round-timeout"]),
    }
    if method in DISTILLATION_METHODS:
        return EnsembleDistillation(
            spec,
            policy,
            budgets,
            make_model=participant.participant_model_factory(config, data_settings(config)),
            server_set=load_server_set(data_settings(config)) if server_set is None else server_set,
            distill=distill_settings(config),
            **options,
        )
    return SubmodelStrategy(spec, policy, budgets, **options)


def round_row(server_round: int, metrics: Mapping[str, float], traffic: RoundTraffic | None, wall_s: float) -> dict[str, Any]:
    """One row of metrics.jsonl."""
    traffic = traffic or RoundTraffic()
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
        "per_participant": traffic.costs,
        "server_costs": traffic.server_costs,
        "wall_s": wall_s,
    }


def run_server(grid: Grid, config: Mapping[str, Any]) -> Path:
    """Train for ``num-server-rounds`` rounds and write the run's outputs.

    With ``checkpoint-every`` > 0, writes a checkpoint every that many rounds;
    with ``resume`` and a checkpoint in ``output-dir``, continues after its round.
    """
    checkpoint = resume_state(config)
    seed = int(config["seed"])
    random.seed(seed)
    torch.manual_seed(seed)
    test_set = load_test_set(data_settings(config))
    global_model = build_model(str(config["model"]), global_widths(config), **model_kwargs(data_settings(config)))
    spec = SplitSpec.from_model(global_model)
    strategy = make_strategy(config, spec)
    meter: TrafficMeter = strategy.meter
    num_rounds = int(config["num-server-rounds"])
    eval_every = int(config["eval-every"])
    checkpoint_every = int(config["checkpoint-every"])
    first_round = 1
    if checkpoint is None:
        if config["resume"]:
            log(INFO, "resume: no checkpoint in %s, starting from scratch", config["output-dir"])
        reporter = RunReporter(config["output-dir"], config)
    else:
        first_round = int(checkpoint["round"]) + 1
        global_model.load_state_dict(checkpoint["global_model"])
        reporter = RunReporter(
            config["output-dir"], config, resume_round=first_round - 1, cumulative_totals=checkpoint["cumulative_totals"]
        )
        restore_rng_states(checkpoint["rng"])
        log(INFO, "resume: continuing %s after round %d", reporter.output_dir, first_round - 1)
    round_start = time.perf_counter()

    def on_round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal round_start
        metrics: dict[str, float] = {}
        if server_round % eval_every == 0 or server_round == num_rounds:
            global_model.load_state_dict(arrays.to_torch_state_dict())
            metrics = evaluate(global_model, test_set)
        traffic = meter.rounds.get(server_round)
        started = traffic.started if traffic else round_start
        reporter.record_round(round_row(server_round, metrics, traffic, time.perf_counter() - started))
        round_start = time.perf_counter()
        return MetricRecord(metrics) if metrics else None

    def checkpoint_round(server_round: int, arrays: ArrayRecord) -> None:
        if checkpoint_every > 0 and server_round % checkpoint_every == 0:
            path = save_checkpoint(
                reporter.output_dir,
                server_round,
                arrays.to_torch_state_dict(),
                config,
                profiles=getattr(strategy, "profiles", None),
                cumulative_totals=reporter.cumulative.totals,
            )
            log(INFO, "checkpoint after round %d: %s", server_round, path)

    train_config = client_config(config)
    train_config[participant.STATE_TAG] = run_fingerprint(config)
    final = run_rounds(
        strategy,
        grid,
        ArrayRecord(global_model.state_dict()),
        num_rounds=num_rounds,
        timeout=float(config["round-timeout"]),
        train_config=train_config,
        evaluate_fn=on_round_end,
        first_round=first_round,
        after_round=checkpoint_round,
    )
    reporter.save_model(final.to_torch_state_dict())
    reporter.plot_curves()
    return reporter.output_dir


def server_config(context_run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Resolved config: defaults < run config < overrides, with an output dir filled in."""
    config = resolve_config({**context_run_config, **(overrides or {})})
    if not config["output-dir"]:
        config["output-dir"] = default_output_dir(config["method"])
    resume_state(config)  # a resume with a changed config fails here, before any training
    return config


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp that runs :func:`run_server` on its run config plus ``overrides``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            config = server_config(context.run_config, overrides)
        except ConfigError as error:
            log(ERROR, "invalid run config: %s", error)
            # Re-raise (an Exception; Flower ignores SystemExit from the ServerApp)
            # so that Flower marks the run as failed.
            raise
        run_server(grid, config)

    return app


def make_client_app() -> ClientApp:
    """The ClientApp: train a received sub-model; answer profile queries."""
    app = ClientApp()
    app.train()(participant.train)
    app.query()(participant.query)
    return app


def run_experiment(
    config: Mapping[str, Any] | None = None,
    num_supernodes: int = 10,
    cpus_per_client: int = 1,
    verbose: bool = False,
    client_app: ClientApp | None = None,
) -> Path:
    """Run a whole federation in-process with Flower's simulation engine.

    ``config`` overrides the defaults (validated before Ray starts); returns
    the output directory. ``client_app`` replaces the ClientApp (tests use it
    to play faulty participants).
    """
    from flwr.simulation import run_simulation

    resolved = server_config({}, config)
    resolved["output-dir"] = str(Path(resolved["output-dir"]).resolve())
    run_simulation(
        server_app=make_server_app(resolved),
        client_app=client_app or make_client_app(),
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
        verbose_logging=verbose,
    )
    log(INFO, "Run finished: %s", resolved["output-dir"])
    return Path(resolved["output-dir"])
