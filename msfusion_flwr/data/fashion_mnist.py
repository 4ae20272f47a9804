"""Fashion-MNIST from the standard IDX files, partitioned with flwr-datasets.

The files are read from ``data-dir`` if given, else Debian's
``dataset-fashion-mnist`` location, else torchvision's download (on machines
with network). Partitions come from flwr-datasets partitioners run on an
in-memory ``datasets.Dataset`` of the labels.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .cache import file_fingerprint
from .partitioning import make_partitioner, server_split
from .settings import DataSettings, DataUnavailableError

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_ROOT = Path.home() / ".cache" / "msfusion-flwr"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


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


def data_fingerprint(settings: DataSettings) -> list[str]:
    """A digest of the training label file: what the partitions depend on besides the settings."""
    folder = locate_fashion_mnist(settings.data_dir)
    return file_fingerprint([_idx_path(folder, IDX_FILES["train"][1])])  # type: ignore[list-item]


def partition_indices(settings: DataSettings, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Training-example indices of every partition; the server slice is in none of them."""
    from datasets import Dataset

    _, labels = load_fashion_mnist(settings.data_dir)["train"]
    subset, _ = server_split(len(labels), settings.data_fraction, settings.server_fraction, settings.seed)
    table = Dataset.from_dict({"label": labels.numpy()[subset], "index": subset})
    partitioner = make_partitioner(settings, num_partitions)
    partitioner.dataset = table
    return tuple(
        np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64)
        for pid in range(num_partitions)
    )


def training_examples(settings: DataSettings, rows: np.ndarray) -> TensorDataset:
    """The training examples ``rows``, normalised."""
    images, labels = load_fashion_mnist(settings.data_dir)["train"]
    idx = torch.from_numpy(rows)
    return TensorDataset(normalize_images(images[idx]), labels[idx])


def test_set(settings: DataSettings) -> TensorDataset:
    """The 10,000 test images, normalised."""
    images, labels = load_fashion_mnist(settings.data_dir)["test"]
    return TensorDataset(normalize_images(images), labels)


def server_set(settings: DataSettings) -> TensorDataset:
    """The server's held-out training examples (:func:`~.partitioning.server_split`), normalised."""
    images, labels = load_fashion_mnist(settings.data_dir)["train"]
    _, held = server_split(len(labels), settings.data_fraction, settings.server_fraction, settings.seed)
    idx = torch.from_numpy(held)
    return TensorDataset(normalize_images(images[idx]), labels[idx])
