"""Flower's deployment engine on this machine: one SuperLink, N SuperNodes, ``flwr run``, all stopped after.

* :mod:`.local`: :class:`LocalDeployment`, the Python API (start, run, kill and restart SuperNodes, stop);
* :mod:`.processes`: starting processes in sessions of their own and stopping every one, by PID;
* :mod:`.certificates`: a CA and a SuperLink certificate, with ``openssl``;
* :mod:`.node_keys`: a SuperNode's authentication key pair, with ``ssh-keygen``;
* :mod:`.flower`: Flower's executables, node configs, the connection in ``config.toml``.

``scripts/deploy_local.py`` is the command line. Only the standard library is
used (the Flower executables come from the venv), so importing this is cheap.
"""

from .certificates import generate_certificates
from .flower import CONNECTION, parse_budgets
from .local import LocalDeployment, RunResult
from .node_keys import generate_node_key
from .processes import DeploymentError, Interrupted, pid_alive, pids_with_marker

__all__ = [
    "CONNECTION", "DeploymentError", "Interrupted", "LocalDeployment", "RunResult", "generate_certificates",
    "generate_node_key", "parse_budgets", "pid_alive", "pids_with_marker",
]  # fmt: skip
