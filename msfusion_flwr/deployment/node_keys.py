"""SuperNode authentication keys: one ECDSA P-384 key pair per device, made with ``ssh-keygen``.

Flower 1.41 authenticates SuperNodes by public key: the SuperLink runs with
``--enable-supernode-auth`` (which needs TLS), an operator registers each
device's public key with ``flwr supernode register <key.pub> <connection>``,
and the device starts ``flower-supernode --auth-supernode-private-key <key>``.
A SuperNode whose key was not registered cannot join.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .processes import DeploymentError


def generate_node_key(key_dir: Path, name: str, ssh_keygen: str = "ssh-keygen") -> tuple[Path, Path]:
    """``(private key, public key)`` files ``<key_dir>/<name>`` and ``<name>.pub`` (OpenSSH format, no passphrase)."""
    if shutil.which(ssh_keygen) is None:
        raise DeploymentError("SuperNode keys need the ssh-keygen command line tool (Debian: openssh-client)")
    key_dir.mkdir(parents=True, exist_ok=True)
    private = key_dir / name
    for path in (private, private.with_name(f"{name}.pub")):
        path.unlink(missing_ok=True)
    done = subprocess.run(
        [ssh_keygen, "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name, "-f", str(private)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise DeploymentError(f"ssh-keygen failed for {name}: {done.stderr.strip()}")
    return private, private.with_name(f"{name}.pub")
