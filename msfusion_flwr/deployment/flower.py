"""Talking to Flower's executables: where they are, node configs, run configs, the connection in ``config.toml``."""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

from .processes import DeploymentError

CONNECTION = "msfusion-local"
"""Name of the SuperLink connection written into ``$FLWR_HOME/config.toml``."""


def flower_bin() -> Path:
    """The folder holding ``flwr``, ``flower-superlink`` and ``flower-supernode``."""
    for candidate in (Path(sysconfig.get_path("scripts")), Path.cwd() / ".venv" / "bin"):
        if (candidate / "flower-superlink").is_file():
            return candidate
    found = shutil.which("flower-superlink")
    if found is None:
        raise DeploymentError("flower-superlink not found: run with the project's venv (.venv/bin/python)")
    return Path(found).parent


def flower_env(flwr_home: Path, bin_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment for Flower's CLI and the processes it spawns, isolated in ``flwr_home``.

    ``bin_dir`` (default :func:`flower_bin`) goes first on ``PATH``, since Flower starts
    its executables by name; no runtime dependency installation, telemetry or update
    check; no ``VIRTUAL_ENV`` (PATH decides); ``extra`` variables on top.
    """
    bin_dir = flower_bin() if bin_dir is None else bin_dir
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        **extra,
    }
    env.pop("VIRTUAL_ENV", None)
    return env


def parse_budgets(text: str | None) -> tuple[float, ...]:
    """``"0.25,0.5,1.0"`` -> (0.25, 0.5, 1.0); each must be in (0, 1]."""
    if not text:
        return ()
    budgets = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"budget {item.strip()!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise ValueError(f"budget {value} must be in (0, 1]")
        budgets.append(value)
    return tuple(budgets)


def _toml_string(text: str) -> str:
    """A TOML literal for ``text`` that Flower's ``key=value`` parser reads back."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    raise ValueError(f"cannot pass {text!r} in a Flower key=value config (it holds both quote kinds)")


def node_config(partition_id: int, num_partitions: int, split_ratio: float | None, data_dir: str | None) -> str:
    """The ``--node-config`` string of one SuperNode."""
    items = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if split_ratio is not None:
        items.append(f"split-ratio={float(split_ratio)!r}")
    if data_dir:
        items.append(f"data-dir={_toml_string(data_dir)}")
    return " ".join(items)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        return json.dumps(str(value))  # a TOML basic string
    raise TypeError(f"run-config value {value!r} must be a str, int, float or bool")


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> Path:
    """Add (or replace) SuperLink connection ``name`` in ``$FLWR_HOME/config.toml``."""
    path = flwr_home / "config.toml"
    fields = {"address": address}
    if root_certificates is None:
        fields["insecure"] = True
    else:
        fields["root-certificates"] = str(root_certificates.resolve())
    if path.exists():  # someone's config: keep their connections and default
        import tomli_w  # a Flower dependency, so in the venv

        data = tomllib.loads(path.read_text())
        data.setdefault("superlink", {})[name] = fields
        path.write_text(tomli_w.dumps(data))
        return path
    lines = ["[superlink]", f"default = {json.dumps(name)}", "", f"[superlink.{name}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in fields.items()]
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
