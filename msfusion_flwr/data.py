"""Datasets and federated partitions.

Fashion-MNIST is read from the standard IDX files: ``data-dir`` if given, else
Debian's ``dataset-fashion-mnist`` location, else torchvision's download (on
machines with network). Partitions come from flwr-datasets partitioners run on
an in-memory ``datasets.Dataset`` of the labels, so they are deterministic by
seed and identical on every node that computes them.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_ROOT = Path.home() / ".cache" / "msfusion-flwr"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
NUM_CLASSES = {"fashion-mnist": 10}
PARTITIONERS = ("iid", "dirichlet", "pathological")


class DataUnavailableError(RuntimeError):
    """The dataset could not be found locally nor downloaded."""


@dataclass(frozen=True)
class DataSettings:
    """Everything that determines a node's partition; identical on all nodes."""

    dataset: str = "fashion-mnist"
    data_dir: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    data_fraction: float = 1.0
    seed: int = 0


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_idx_files(folder: Path) -> bool:
    return all(_idx_path(folder, s) for pair in IDX_FILES.values() for s in pair)


def _download_with_torchvision() -> Path:
    from torchvision.datasets import FashionMNIST  # imported lazily: only online machines need it

    try:
        FashionMNIST(str(DOWNLOAD_ROOT), train=True, download=True)
        FashionMNIST(str(DOWNLOAD_ROOT), train=False, download=True)
    except Exception as exc:  # any network or mirror failure
        raise DataUnavailableError(
            f"Fashion-MNIST not found in {SYSTEM_FASHION_MNIST} and the torchvision download "
            f"failed ({type(exc).__name__}); install Debian's dataset-fashion-mnist or set data-dir"
        ) from None
    return DOWNLOAD_ROOT / "FashionMNIST" / "raw"


def locate_fashion_mnist(data_dir: str = "") -> Path:
    """The folder holding the four IDX files, searched in the documented order."""
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not _has_idx_files(folder):
            raise DataUnavailableError(f"data-dir {folder} does not hold the four Fashion-MNIST IDX files")
        return folder
    for folder in (SYSTEM_FASHION_MNIST, DOWNLOAD_ROOT / "FashionMNIST" / "raw"):
        if _has_idx_files(folder):
            return folder
    return _download_with_torchvision()


@lru_cache(maxsize=2)
def load_fashion_mnist(data_dir: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (images, labels), "test": ...}``; images uint8 (N, 1, 28, 28)."""
    folder = locate_fashion_mnist(data_dir)
    splits = {}
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images = read_idx(_idx_path(folder, images_stem))  # type: ignore[arg-type]
        labels = read_idx(_idx_path(folder, labels_stem))  # type: ignore[arg-type]
        splits[split] = (
            torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)),
        )
    return splits


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> standardised float32."""
    return (images.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


def make_partitioner(settings: DataSettings, num_partitions: int):  # noqa: ANN201 (flwr-datasets type)
    """The flwr-datasets partitioner named in ``settings``."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if settings.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if settings.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=settings.dirichlet_alpha,
            seed=settings.seed,
        )
    if settings.partitioner == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=settings.classes_per_partition,
            class_assignment_mode="deterministic",
            seed=settings.seed,
        )
    raise ValueError(f"unknown partitioner {settings.partitioner!r}; choose one of {PARTITIONERS}")


def training_subset(num_examples: int, fraction: float, seed: int) -> np.ndarray:
    """Seeded subset of training-example indices (all of them when fraction == 1)."""
    if fraction >= 1.0:
        return np.arange(num_examples)
    rng = np.random.default_rng(seed)
    keep = max(1, int(round(fraction * num_examples)))
    return np.sort(rng.choice(num_examples, size=keep, replace=False))


@lru_cache(maxsize=4)
def partition_indices(settings: DataSettings, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Training-example indices of every partition."""
    from datasets import Dataset

    _, labels = load_fashion_mnist(settings.data_dir)["train"]
    subset = training_subset(len(labels), settings.data_fraction, settings.seed)
    table = Dataset.from_dict({"label": labels.numpy()[subset], "index": subset})
    partitioner = make_partitioner(settings, num_partitions)
    partitioner.dataset = table
    return tuple(
        np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64)
        for pid in range(num_partitions)
    )


def load_partition(settings: DataSettings, partition_id: int, num_partitions: int) -> TensorDataset:
    """The training examples of one participant."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    images, labels = load_fashion_mnist(settings.data_dir)["train"]
    idx = torch.from_numpy(partition_indices(settings, num_partitions)[partition_id])
    return TensorDataset(normalize_images(images[idx]), labels[idx])


def load_test_set(settings: DataSettings) -> TensorDataset:
    """The held-out test set the server evaluates the global model on."""
    images, labels = load_fashion_mnist(settings.data_dir)["test"]
    return TensorDataset(normalize_images(images), labels)
