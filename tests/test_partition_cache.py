"""Partition indices cached on disk: the same partitions as computed, a new entry whenever anything that
determines them changes, and a broken entry recomputed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msfusion_flwr.data import DataSettings, fashion_mnist, partition_indices
from msfusion_flwr.data.cache import CACHE_ENV, cache_key

SETTINGS = DataSettings(data_fraction=0.05)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    partition_indices.cache_clear()
    yield tmp_path / "partitions"
    partition_indices.cache_clear()


def fresh(settings: DataSettings, n: int) -> tuple[np.ndarray, ...]:
    """Partitions as a new process computes them: no in-memory cache."""
    partition_indices.cache_clear()
    return partition_indices(settings, n)


def test_a_new_process_reads_the_entry_instead_of_partitioning_again(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    computed = fresh(SETTINGS, 4)
    assert len(list(cache.glob("*.npz"))) == 1
    monkeypatch.setattr(fashion_mnist, "partition_indices", lambda *a: pytest.fail("partitioned again"))
    cached = fresh(SETTINGS, 4)
    assert [p.tolist() for p in cached] == [p.tolist() for p in computed]
    assert all(p.dtype == np.int64 for p in cached)


@pytest.mark.parametrize(
    "change", [{"seed": 1}, {"dirichlet_alpha": 0.3}, {"data_fraction": 0.06}, {"partitioner": "iid"}, {"server_fraction": 0.1}]
)
def test_anything_that_determines_the_partitions_gives_another_entry(cache: Path, change: dict) -> None:
    base = fresh(SETTINGS, 4)
    other_settings = DataSettings(**{**SETTINGS.__dict__, **change})
    other = fresh(other_settings, 4)
    assert len(list(cache.glob("*.npz"))) == 2
    assert [p.tolist() for p in other] != [p.tolist() for p in base]
    assert [p.tolist() for p in fresh(other_settings, 4)] == [p.tolist() for p in other]


def test_the_key_covers_the_partition_count_and_the_data_files() -> None:
    assert cache_key(SETTINGS, 4, ["a"]) != cache_key(SETTINGS, 5, ["a"])
    assert cache_key(SETTINGS, 4, ["a"]) != cache_key(SETTINGS, 4, ["b"])
    assert cache_key(SETTINGS, 4, ["a"]) == cache_key(DataSettings(data_fraction=0.05), 4, ["a"])


def test_a_broken_entry_is_recomputed_and_rewritten(cache: Path) -> None:
    computed = fresh(SETTINGS, 4)
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(b"not a zip file")
    again = fresh(SETTINGS, 4)
    assert [p.tolist() for p in again] == [p.tolist() for p in computed]
    assert [p.tolist() for p in fresh(SETTINGS, 4)] == [p.tolist() for p in computed]  # rewritten: readable again
    assert entry.read_bytes()[:2] == b"PK"


def test_an_empty_cache_setting_turns_the_disk_cache_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, "")
    monkeypatch.chdir(tmp_path)
    fresh(SETTINGS, 3)
    assert not list(tmp_path.rglob("*.npz"))
