"""Partitions computed once per machine: indices cached on disk, keyed by everything that determines them.

In deployment Flower starts a fresh ClientApp process for every message, so without a disk cache
every round would re-run the partitioner (about 4 s for 10 Dirichlet partitions of Fashion-MNIST
here, plus importing ``datasets``). The key hashes the data settings, the number of partitions,
this file's format version and the source's fingerprint of its files (a digest of the bytes the
partitions depend on, the labels), so a changed seed, alpha or data file gives a different entry. Entries are
written to a temporary file and renamed into place, so nodes sharing a disk never read half a file;
an unreadable entry is recomputed and rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

from .settings import DataSettings

FORMAT_VERSION = 1
"""Raised whenever the way partitions are computed changes, so old entries are never read."""
CACHE_ENV = "MSFUSION_CACHE_DIR"
"""Where entries go (``<dir>/partitions``); default ``~/.cache/msfusion-flwr``. Empty string: no disk cache."""


def cache_dir() -> Path | None:
    """The partition cache folder, or None when ``MSFUSION_CACHE_DIR`` is set to the empty string."""
    root = os.environ.get(CACHE_ENV)
    if root == "":
        return None
    return Path(root).expanduser() / "partitions" if root else Path.home() / ".cache" / "msfusion-flwr" / "partitions"


NOT_PARTITIONING = ("test_examples",)
"""Data settings that do not change the partitions (the server's test set): not in the key."""


def cache_key(settings: DataSettings, num_partitions: int, fingerprint: object) -> str:
    """A hex digest of everything that determines the partitions."""
    material = {
        "version": FORMAT_VERSION,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in NOT_PARTITIONING},
        "num_partitions": num_partitions,
        "fingerprint": fingerprint,
        "libraries": {name: _version(name) for name in ("flwr-datasets", "numpy")},  # the partitioners' code
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def file_fingerprint(paths: list[Path]) -> list[str]:
    """The SHA-256 of each file's bytes: what a cached partition of them depends on besides the settings.

    Content, not path or modification time: a copy of the same files elsewhere shares the entry,
    a rewritten file never does. Meant for small files (a label file: 60 kB for Fashion-MNIST).
    """
    return [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]


def _read(path: Path, num_partitions: int) -> tuple[np.ndarray, ...] | None:
    try:
        with np.load(path, allow_pickle=False) as entry:
            parts = tuple(entry[f"p{i}"].astype(np.int64, copy=False) for i in range(num_partitions))
    except (OSError, KeyError, ValueError, EOFError):
        return None
    return parts


def _write(path: Path, parts: tuple[np.ndarray, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **{f"p{i}": p for i, p in enumerate(parts)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_partitions(
    settings: DataSettings,
    num_partitions: int,
    fingerprint: object,
    compute: Callable[[], tuple[np.ndarray, ...]],
) -> tuple[np.ndarray, ...]:
    """The cached partitions for this key, or ``compute()``'s, stored for the next process.

    A cache folder that cannot be written (read-only disk) only costs the recomputation.
    """
    folder = cache_dir()
    if folder is None:
        return compute()
    path = folder / f"{cache_key(settings, num_partitions, fingerprint)}.npz"
    parts = _read(path, num_partitions) if path.is_file() else None
    if parts is not None:
        return parts
    parts = compute()
    try:
        _write(path, parts)
    except OSError:
        pass
    return parts
