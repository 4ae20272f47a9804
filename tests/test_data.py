"""Fashion-MNIST IDX reading and federated partitions, on tiny IDX files written here."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from msfusion_flwr.data import DataSettings, DataUnavailableError, load_partition, load_test_set, partition_indices
from msfusion_flwr.data.cache import cache_key
from msfusion_flwr.data import fashion_mnist as data_mod
from msfusion_flwr.data.fashion_mnist import load_fashion_mnist, locate_fashion_mnist, normalize_images

NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@pytest.fixture(autouse=True)
def clear_caches():
    load_fashion_mnist.cache_clear()
    partition_indices.cache_clear()
    yield
    load_fashion_mnist.cache_clear()
    partition_indices.cache_clear()


def idx_images(images: np.ndarray) -> bytes:
    """IDX3: magic 0x00000803, then N, 28, 28 as big-endian uint32, then the pixels."""
    n, rows, cols = images.shape
    return struct.pack(">IIII", 0x00000803, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    """IDX1: magic 0x00000801, then N as big-endian uint32, then the labels."""
    return struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes()


def write_fashion_mnist(folder: Path, n_train: int, n_test: int, seed: int = 0, gz: bool | str = True):
    """Write random images and balanced labels under the four standard names.

    ``gz`` may be True, False or "mixed" (train gzipped, test plain).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        compress = gz is True or (gz == "mixed" and split == "train")
        for stem, payload in zip(NAMES[split], (idx_images(images), idx_labels(labels))):
            if compress:
                with gzip.open(folder / (stem + ".gz"), "wb") as f:
                    f.write(payload)
            else:
                (folder / stem).write_bytes(payload)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False, "mixed"], ids=["gzip", "plain", "mixed"])
def test_load_reads_idx_files_exactly(tmp_path, gz):
    """load_fashion_mnist returns the written pixels (N, 1, 28, 28) uint8 and labels int64, bit for bit."""
    written = write_fashion_mnist(tmp_path / "fm", n_train=37, n_test=11, seed=3, gz=gz)
    loaded = load_fashion_mnist(str(tmp_path / "fm"))
    assert set(loaded) == {"train", "test"}
    for split, (images, labels) in written.items():
        got_images, got_labels = loaded[split]
        assert got_images.dtype == torch.uint8
        assert got_images.shape == (len(labels), 1, 28, 28)
        assert np.array_equal(got_images[:, 0].numpy(), images)
        assert got_labels.dtype == torch.int64
        assert got_labels.tolist() == labels.tolist()


def test_locate_finds_given_dir(tmp_path):
    """A data-dir holding the four files is used as is."""
    write_fashion_mnist(tmp_path, n_train=10, n_test=10)
    assert locate_fashion_mnist(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("missing", ["train-labels-idx1-ubyte", None])
def test_locate_missing_files_raises_one_line(tmp_path, missing):
    """An empty data-dir, or one missing a file, raises DataUnavailableError with a one-line message."""
    if missing:
        write_fashion_mnist(tmp_path, n_train=10, n_test=10)
        (tmp_path / (missing + ".gz")).unlink()
    with pytest.raises(DataUnavailableError) as info:
        locate_fashion_mnist(str(tmp_path))
    assert "\n" not in str(info.value)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataUnavailableError):
        load_fashion_mnist(str(tmp_path))


def test_locate_empty_dir_never_downloads(tmp_path, monkeypatch):
    """With an explicit data-dir, a missing dataset is an error, not a download."""
    monkeypatch.setattr(data_mod, "_download_with_torchvision", lambda: pytest.fail("tried to download"))
    with pytest.raises(DataUnavailableError):
        locate_fashion_mnist(str(tmp_path))


# --------------------------------------------------------------------------- partitions

N_TRAIN = 600


@pytest.fixture
def fm_dir(tmp_path) -> str:
    write_fashion_mnist(tmp_path / "fm", n_train=N_TRAIN, n_test=20, seed=7)
    return str(tmp_path / "fm")


def train_labels(folder: str) -> np.ndarray:
    return load_fashion_mnist(folder)["train"][1].numpy()


def assert_disjoint_within(parts, n_total: int):
    seen: set[int] = set()
    for part in parts:
        assert part.dtype == np.int64
        values = part.tolist()
        assert len(values) == len(set(values)), "an index repeats inside a partition"
        assert all(0 <= v < n_total for v in values)
        assert seen.isdisjoint(values), "two partitions share an example"
        seen.update(values)
    return seen


@pytest.mark.parametrize(
    "partitioner,extra",
    [("iid", {}), ("dirichlet", {"dirichlet_alpha": 1.0}), ("pathological", {"classes_per_partition": 2})],
)
def test_partitions_disjoint_complete_and_deterministic(fm_dir, partitioner, extra):
    """Partitions are disjoint, cover every example they should, and repeat exactly for the same seed.

    iid and Dirichlet use every example. The pathological partitioner (deterministic
    class assignment) gives partition i the classes i, i+1, ... mod 10, so with 5
    partitions of 2 classes only the examples of classes 0-5 are used.
    """
    s = DataSettings(data_dir=fm_dir, partitioner=partitioner, seed=11, **extra)
    parts = partition_indices(s, 5)
    assert len(parts) == 5
    labels = train_labels(fm_dir)
    if partitioner == "pathological":
        used = {(i + k) % 10 for i in range(5) for k in range(extra["classes_per_partition"])}
        expected = {i for i in range(N_TRAIN) if labels[i] in used}
    else:
        expected = set(range(N_TRAIN))
    assert assert_disjoint_within(parts, N_TRAIN) == expected
    partition_indices.cache_clear()
    load_fashion_mnist.cache_clear()
    again = partition_indices(DataSettings(data_dir=fm_dir, partitioner=partitioner, seed=11, **extra), 5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_depends_on_seed(fm_dir):
    """Dirichlet partitions differ between seeds."""
    a = partition_indices(DataSettings(data_dir=fm_dir, partitioner="dirichlet", dirichlet_alpha=1.0, seed=0), 4)
    b = partition_indices(DataSettings(data_dir=fm_dir, partitioner="dirichlet", dirichlet_alpha=1.0, seed=1), 4)
    assert [sorted(p.tolist()) for p in a] != [sorted(p.tolist()) for p in b]


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_pathological_partitions_hold_few_classes(fm_dir, classes):
    """A pathological partition holds examples of at most classes-per-partition labels."""
    labels = train_labels(fm_dir)
    parts = partition_indices(
        DataSettings(data_dir=fm_dir, partitioner="pathological", classes_per_partition=classes, seed=2), 6
    )
    assert_disjoint_within(parts, N_TRAIN)
    for pid, part in enumerate(parts):
        assert len(part) > 0
        held = set(labels[part].tolist())
        assert len(held) <= classes
        assert held <= {(pid + k) % 10 for k in range(classes)}


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_data_fraction_keeps_seeded_fraction(fm_dir, fraction):
    """data-fraction keeps round(f * N) examples, the same ones for the same seed, others for another seed."""
    def kept(seed: int) -> set[int]:
        s = DataSettings(data_dir=fm_dir, partitioner="iid", data_fraction=fraction, seed=seed)
        parts = partition_indices(s, 3)
        return assert_disjoint_within(parts, N_TRAIN)

    first = kept(5)
    assert len(first) == round(fraction * N_TRAIN)
    partition_indices.cache_clear()
    assert kept(5) == first
    assert kept(6) != first


def test_load_partition_returns_its_examples(fm_dir):
    """load_partition returns the normalised images and labels at the partition's indices."""
    s = DataSettings(data_dir=fm_dir, partitioner="iid", seed=0)
    images, labels = load_fashion_mnist(fm_dir)["train"]
    for pid in range(3):
        idx = partition_indices(s, 3)[pid]
        x, y = load_partition(s, pid, 3).tensors
        assert torch.equal(y, labels[torch.from_numpy(idx)])
        assert torch.equal(x, normalize_images(images[torch.from_numpy(idx)]))
        assert x.dtype == torch.float32
    with pytest.raises(ValueError):
        load_partition(s, 3, 3)


def test_test_examples_keeps_the_test_sets_first_examples(fm_dir):
    """test-examples = N evaluates on the first N test examples; 0 (and N beyond the set) keeps all; the
    partitions, and their cache key, do not depend on it."""
    full = load_test_set(DataSettings(data_dir=fm_dir))
    part = load_test_set(DataSettings(data_dir=fm_dir, test_examples=7))
    assert len(full) == 20 and len(part) == 7
    assert all(torch.equal(a, b[:7]) for a, b in zip(part.tensors, full.tensors, strict=True))
    assert len(load_test_set(DataSettings(data_dir=fm_dir, test_examples=50))) == 20
    same = [DataSettings(data_dir=fm_dir, partitioner="iid", test_examples=n) for n in (0, 7)]
    assert cache_key(same[0], 3, "f") == cache_key(same[1], 3, "f")


def test_normalize_images_standardises():
    """normalize_images maps uint8 pixel p to (p/255 - 0.2860) / 0.3530."""
    pixels = torch.tensor([[[[0, 255, 73]]]], dtype=torch.uint8)
    expected = torch.tensor([[[[(p / 255 - 0.2860) / 0.3530 for p in (0, 255, 73)]]]])
    torch.testing.assert_close(normalize_images(pixels), expected)
