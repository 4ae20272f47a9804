"""The Flower boundary: the ServerApp and ClientApp, and the one function that runs a federation in-process.

``make_server_app(overrides)`` / ``make_client_app()`` build the apps that
``flwr run`` loads (through ``server_app.py`` / ``client_app.py``) and that
:func:`run_experiment` hands to Flower's in-process ``run_simulation``, which
passes no run config: there, the config mapping comes in as ``overrides``.
Here the run config is resolved and validated once (:func:`server_config`);
everything below receives the typed :class:`~msfusion_flwr.config.RunConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from .config import ConfigError, RunConfig
from .device import participant
from .models.placement import resolve_device

# The server's modules (and what they import: dp-accounting, scipy, the reporting) load inside the server
# functions, so a device importing the ClientApp loads only what training needs (tests/test_packaging.py).


def server_config(context_run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> RunConfig:
    """Resolved config: defaults < run config < overrides, with an output dir filled in.

    A resume whose config differs from its checkpoint's fails here, before any training.
    """
    from .server.checkpoint import resume_state
    from .server.reporting import default_output_dir

    run = RunConfig.from_mapping({**context_run_config, **(overrides or {})})
    if not run.outputs.output_dir:
        run = run.with_outputs(output_dir=default_output_dir(run.method.name))
    resume_state(run)
    return run


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp that runs :func:`~msfusion_flwr.server.run.run_server` on its run config plus ``overrides``."""
    from .data import DataUnavailableError, PartitionError
    from .server.nodes import NodesUnavailable
    from .server.run import RunAborted, run_server

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # Each mistake is logged as one line, then re-raised (an Exception; Flower
        # ignores SystemExit from the ServerApp) so that Flower marks the run as failed.
        try:
            run = server_config(context.run_config, overrides)
        except ConfigError as error:
            log(ERROR, "invalid run config: %s", error)
            raise
        try:
            run_server(grid, run)
        except (PartitionError, DataUnavailableError) as error:
            log(ERROR, "invalid run config: %s", error)
            raise
        except (NodesUnavailable, RunAborted) as error:
            log(ERROR, "run stopped: %s", error)
            raise

    return app


def make_client_app() -> ClientApp:
    """The ClientApp: train a received sub-model; answer profile queries."""
    app = ClientApp()
    app.train()(participant.train)
    app.query()(participant.query)
    return app


def check_node_count(run: RunConfig, num_supernodes: int) -> None:
    """Refuse, before anything starts, a run that waits for more nodes than the federation has."""
    if run.federation.min_available_nodes > num_supernodes:
        raise ConfigError(
            f"config key 'min-available-nodes' is {run.federation.min_available_nodes} but the simulation has "
            f"{num_supernodes} SuperNodes: lower min-available-nodes or raise num_supernodes (--num-supernodes)"
        )


def client_resources(run: RunConfig, num_supernodes: int, cpus_per_client: int) -> dict[str, float]:
    """Ray's resources per simulated participant: a GPU share when ``torch-device`` resolves to CUDA here.

    Ray hides GPUs from actors that ask for none, so participants that train on
    CUDA ask for an equal share of one GPU, as many as can run at once on the
    CPUs; a CUDA device named but absent is refused before Ray starts.
    """
    try:
        device = resolve_device(run.local.device)
    except RuntimeError as error:
        raise ConfigError(f"config key 'torch-device': {error}") from None
    if device.type != "cuda":
        return {"num_cpus": cpus_per_client, "num_gpus": 0.0}
    concurrent = max(1, min(num_supernodes, (os.cpu_count() or 1) // cpus_per_client))
    return {"num_cpus": cpus_per_client, "num_gpus": 1.0 / concurrent}


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

    run = server_config({}, config)
    check_node_count(run, num_supernodes)
    run = run.with_outputs(output_dir=str(Path(run.outputs.output_dir).resolve()))
    run_simulation(
        server_app=make_server_app(run.to_dict()),
        client_app=client_app or make_client_app(),
        num_supernodes=num_supernodes,
        backend_config={"client_resources": client_resources(run, num_supernodes, cpus_per_client)},
        verbose_logging=verbose,
    )
    log(INFO, "Run finished: %s", run.outputs.output_dir)
    return Path(run.outputs.output_dir)
