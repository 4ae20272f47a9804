"""Run a federation in-process: ``python -m msfusion_flwr [--run-config FILE|"k=v ..."]``.

The same apps as ``flwr run .``, through Flower's in-process simulation engine
(no SuperLink), for scripts and quick experiments.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from flwr.common.config import parse_config_args

from .apps import run_experiment
from .config import ConfigError
from .data import DataUnavailableError, PartitionError
from .server.nodes import NodesUnavailable
from .server.run import RunAborted


def parse_run_config(text: str | None) -> dict[str, Any]:
    """A run config given as a .toml path or as ``"k=v k2='s'"`` (like ``flwr run``)."""
    if not text:
        return {}
    if text.endswith(".toml"):
        return tomllib.loads(Path(text).read_text())
    return dict(parse_config_args([text]))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m msfusion_flwr", description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", help="a .toml file or \"key=value key2='text'\"")
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    args = parser.parse_args()
    try:
        config = parse_run_config(args.run_config)
        config.setdefault("min-available-nodes", args.num_supernodes)
        out = run_experiment(config, num_supernodes=args.num_supernodes, cpus_per_client=args.cpus_per_client)
    except (ConfigError, DataUnavailableError, PartitionError, OSError, tomllib.TOMLDecodeError) as error:
        parser.exit(2, f"error: {error}\n")
    except (NodesUnavailable, RunAborted) as error:
        parser.exit(1, f"run stopped: {error}\n")
    print(out)


if __name__ == "__main__":
    main()
