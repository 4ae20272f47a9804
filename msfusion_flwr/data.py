"""Datasets and federated partitions.

Fashion-MNIST is read from the standard IDX files: ``data-dir`` if given, else
Debian's ``dataset-fashion-mnist`` location, else torchvision's download (on
machines with network). Its partitions come from flwr-datasets partitioners run
on an in-memory ``datasets.Dataset`` of the labels.

CIFAR-10 and CIFAR-100 are loaded through flwr-datasets' ``FederatedDataset``:
from the Hugging Face Hub (``uoft-cs/cifar10``, ``uoft-cs/cifar100``), or, when
``data-dir`` is set, from a local folder in the Hub's format (``train`` and
``test`` parquet files with the Hub's columns: ``img`` and ``label`` for
CIFAR-10, ``img``, ``fine_label`` and ``coarse_label`` for CIFAR-100; a
snapshot of the Hub repository works as is). The ``FederatedDataset`` applies
the partitioner to the training split after a preprocessor keeps the seeded
``data-fraction`` subset and shuffles it with the seed. Training partitions
are augmented (random 32x32 crop of the 4-pixel zero-padded image, random
horizontal flip) every time an example is drawn.

Either way partitions are deterministic by seed and identical on every node
that computes them.

``server-data-fraction`` holds a seeded fraction of the (``data-fraction``)
training subset out for the server (:func:`server_split`): those examples are
removed from what the partitioner splits, for every method, and
:func:`load_server_set` returns them (FedDF distils on them without labels).
With ``server-data-fraction = 0`` nothing is held out and the partitions are
exactly those without the option.

WikiText-2 (``dataset = "wikitext-2"``, causal language modelling) lives in
:mod:`msfusion_flwr.text_data`; the functions here dispatch to it. Its
examples are ``TensorDataset(x, y)`` of int64 token windows (N, ``seq_len``)
with ``y`` the next tokens, and its partitioners are ``iid`` and
``contiguous`` (runs of consecutive articles).
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_ROOT = Path.home() / ".cache" / "msfusion-flwr"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
IN_CHANNELS = {"fashion-mnist": 1, "cifar10": 3, "cifar100": 3}
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "wikitext-2")
TEXT_DATASETS = ("wikitext-2",)
"""Language-modelling datasets (:mod:`msfusion_flwr.text_data`); the others are image classification."""
PARTITIONERS = ("iid", "dirichlet", "pathological", "contiguous")
"""``contiguous`` is for text only; ``dirichlet`` and ``pathological`` for images only."""


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
    server_fraction: float = 0.0
    seq_len: int = 64
    """Text: tokens per training/test sequence."""
    train_split: str = "train"
    """Text: the split participants train on, ``train`` or ``valid`` (the test split is always ``test``)."""
    vocab_size: int = 0
    """Text: vocabulary entries kept, special tokens included; 0 keeps every training word."""


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


def make_partitioner(  # noqa: ANN201 (flwr-datasets type)
    settings: DataSettings, num_partitions: int, partition_by: str = "label"
):
    """The flwr-datasets partitioner named in ``settings``, splitting on column ``partition_by``."""
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
            partition_by=partition_by,
            alpha=settings.dirichlet_alpha,
            seed=settings.seed,
        )
    if settings.partitioner == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=partition_by,
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


SERVER_SLICE_STREAM = 1
"""Second entry of the server slice's seed, ``default_rng([seed, SERVER_SLICE_STREAM])``:
a stream independent of ``training_subset``'s ``default_rng(seed)``."""


def server_split(
    num_examples: int, data_fraction: float, server_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(participants' pool, server slice)``: disjoint, ascending training-example indices.

    The ``data_fraction`` subset (:func:`training_subset`) is split: a seeded
    ``round(server_fraction * n)`` of its ``n`` examples (at least one, at most
    ``n - 1``) go to the server, the rest to the participants' partitioner.
    With ``server_fraction == 0`` the pool is the subset itself and the slice empty.
    """
    subset = training_subset(num_examples, data_fraction, seed)
    if server_fraction <= 0.0:
        return subset, subset[:0]
    size = min(len(subset) - 1, max(1, int(round(server_fraction * len(subset)))))
    held = np.zeros(len(subset), dtype=bool)
    held[np.random.default_rng([seed, SERVER_SLICE_STREAM]).choice(len(subset), size=size, replace=False)] = True
    return subset[~held], subset[held]


@lru_cache(maxsize=4)
def partition_indices(settings: DataSettings, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Training-example indices of every partition (rows of the training split).

    The server slice (``settings.server_fraction``) is never in any partition.
    For text the indices are training-sequence numbers (:mod:`msfusion_flwr.text_data`).
    """
    if settings.dataset in TEXT_DATASETS:
        from . import text_data

        return text_data.partition_indices(settings, num_partitions)
    if settings.dataset in HUB_DATASETS:
        return _hub_partition_indices(settings, num_partitions)
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


def load_partition(settings: DataSettings, partition_id: int, num_partitions: int) -> TorchDataset:
    """The training examples of one participant (augmented for CIFAR; token windows for text)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    if settings.dataset in TEXT_DATASETS:
        from . import text_data

        return text_data.load_sequences(settings, partition_indices(settings, num_partitions)[partition_id])
    if settings.dataset in HUB_DATASETS:
        spec = HUB_DATASETS[settings.dataset]
        images, labels = load_hub_split(settings.dataset, settings.data_dir, "train")
        idx = torch.from_numpy(partition_indices(settings, num_partitions)[partition_id])
        return AugmentedImages(images[idx], labels[idx], spec.mean, spec.std)
    images, labels = load_fashion_mnist(settings.data_dir)["train"]
    idx = torch.from_numpy(partition_indices(settings, num_partitions)[partition_id])
    return TensorDataset(normalize_images(images[idx]), labels[idx])


def load_test_set(settings: DataSettings) -> TensorDataset:
    """The held-out test set the server evaluates the global model on."""
    if settings.dataset in TEXT_DATASETS:
        from . import text_data

        return text_data.load_test_set(settings)
    if settings.dataset in HUB_DATASETS:
        spec = HUB_DATASETS[settings.dataset]
        images, labels = load_hub_split(settings.dataset, settings.data_dir, "test")
        return TensorDataset(standardize(images, spec.mean, spec.std), labels)
    images, labels = load_fashion_mnist(settings.data_dir)["test"]
    return TensorDataset(normalize_images(images), labels)


def load_server_set(settings: DataSettings) -> TensorDataset:
    """The server's held-out slice of the training set (:func:`server_split`), without augmentation.

    Images are normalised as the test set's; the labels are in the dataset
    (a ``TensorDataset`` of images and labels) but FedDF's distillation never
    reads them. Empty when ``server_fraction == 0``. For text: the held-out
    training sequences (``TensorDataset(x, y)``).
    """
    if settings.dataset in TEXT_DATASETS:
        from . import text_data

        return text_data.load_server_set(settings)
    if settings.dataset in HUB_DATASETS:
        spec = HUB_DATASETS[settings.dataset]
        images, labels = load_hub_split(settings.dataset, settings.data_dir, "train")
        _, held = server_split(len(labels), settings.data_fraction, settings.server_fraction, settings.seed)
        idx = torch.from_numpy(held)
        return TensorDataset(standardize(images[idx], spec.mean, spec.std), labels[idx])
    images, labels = load_fashion_mnist(settings.data_dir)["train"]
    _, held = server_split(len(labels), settings.data_fraction, settings.server_fraction, settings.seed)
    idx = torch.from_numpy(held)
    return TensorDataset(normalize_images(images[idx]), labels[idx])


def model_kwargs(settings: DataSettings) -> dict[str, int]:
    """The model constructor arguments the data fixes.

    Images: ``num_classes`` and ``in_channels``. Text: ``vocab_size`` (the
    vocabulary's entries, special tokens included; this loads the training
    text) and ``max_len`` (``settings.seq_len``).
    """
    dataset = settings.dataset
    if dataset in TEXT_DATASETS:
        from . import text_data

        return {"vocab_size": text_data.vocabulary_size(settings), "max_len": settings.seq_len}
    if dataset not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    return {"num_classes": NUM_CLASSES[dataset], "in_channels": IN_CHANNELS[dataset]}


# --------------------------------------------------------------------------- CIFAR via flwr-datasets


@dataclass(frozen=True)
class HubImageDataset:
    """An image-classification dataset on the Hugging Face Hub and how to read it."""

    hub_id: str
    label_column: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_column: str = "img"
    image_size: int = 32


HUB_DATASETS = {
    "cifar10": HubImageDataset(
        "uoft-cs/cifar10", "label", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": HubImageDataset(
        "uoft-cs/cifar100", "fine_label", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
}
"""Datasets loaded through ``FederatedDataset``; mean and std are the training split's per channel."""
SPLITS = ("train", "test")
AUGMENT_PADDING = 4


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def federated_dataset(dataset: str, data_dir: str = "", **kwargs: Any):  # noqa: ANN201 (flwr-datasets type)
    """``FederatedDataset`` of ``dataset``: the Hub id, or the local folder ``data_dir`` when set.

    Rows keep the files' order (``shuffle=False``); ``kwargs`` (``partitioners``,
    ``preprocessor``) are passed on, ``partitioners`` defaulting to none.
    """
    from flwr_datasets import FederatedDataset

    spec = HUB_DATASETS[dataset]
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataUnavailableError(
                f"data-dir {folder} is not a folder holding {dataset}'s train/test parquet files"
            )
        source = str(folder)
    else:
        source = spec.hub_id
    kwargs.setdefault("partitioners", {})
    return FederatedDataset(dataset=source, shuffle=False, **kwargs)


def _load_split(fds: Any, dataset: str, data_dir: str, split: str, columns: Sequence[str]) -> Any:
    """``fds.load_split(split)``, checked to hold ``columns``.

    Any failure to get the data is a one-line :class:`DataUnavailableError`.
    """
    spec = HUB_DATASETS[dataset]
    where = f"data-dir {Path(data_dir).expanduser()}" if data_dir else f"the Hugging Face Hub ({spec.hub_id})"
    try:
        table = fds.load_split(split)
    except Exception as exc:  # network, missing files, missing split: all mean "no data here"
        hint = "" if data_dir else "; set data-dir to a local copy in the Hub's parquet format"
        message = f"{dataset} could not be loaded from {where} ({_one_line(exc)}){hint}"
        raise DataUnavailableError(message) from None
    missing = set(columns) - set(table.column_names)
    if missing:
        raise DataUnavailableError(
            f"{dataset} split {split!r} from {where} lacks column(s) {sorted(missing)} "
            f"(has {table.column_names})"
        )
    return table


@lru_cache(maxsize=4)
def load_hub_split(dataset: str, data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of one split in file order: uint8 (N, 3, H, W) and int64 (N,)."""
    from datasets import Image

    spec = HUB_DATASETS[dataset]
    columns = [spec.image_column, spec.label_column]
    table = _load_split(federated_dataset(dataset, data_dir), dataset, data_dir, split, columns)
    table = table.select_columns(columns)
    table = table.cast_column(spec.image_column, Image(mode="RGB")).with_format("numpy")
    images, labels = [], []
    for batch in table.iter(batch_size=2048):
        images.append(np.asarray(batch[spec.image_column], dtype=np.uint8))
        labels.append(np.asarray(batch[spec.label_column], dtype=np.int64))
    if not images:
        raise DataUnavailableError(f"{dataset} split {split!r} is empty")
    stacked = np.concatenate(images)
    size = spec.image_size
    if stacked.ndim != 4 or stacked.shape[1:] != (size, size, 3):
        raise DataUnavailableError(
            f"{dataset} images have shape {stacked.shape[1:]}, expected ({size}, {size}, 3)"
        )
    return (
        torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))),
        torch.from_numpy(np.concatenate(labels)),
    )


class _FractionAndShuffle:
    """FederatedDataset preprocessor: keep the training split's labels and row numbers
    (column ``index``), take the seeded ``data-fraction`` subset less the server slice
    (:func:`server_split`), shuffle it with the seed."""

    def __init__(self, label_column: str, fraction: float, seed: int, server_fraction: float = 0.0) -> None:
        self.label_column, self.fraction, self.seed = label_column, fraction, seed
        self.server_fraction = server_fraction

    def __call__(self, dataset_dict: Any) -> Any:
        from datasets import DatasetDict

        train = dataset_dict["train"].select_columns([self.label_column])
        train = train.add_column("index", np.arange(len(train), dtype=np.int64))
        pool, _ = server_split(len(train), self.fraction, self.server_fraction, self.seed)
        train = train.select(pool)
        return DatasetDict({"train": train.shuffle(seed=self.seed)})


def _hub_partition_indices(settings: DataSettings, num_partitions: int) -> tuple[np.ndarray, ...]:
    spec = HUB_DATASETS[settings.dataset]
    fds = federated_dataset(
        settings.dataset,
        settings.data_dir,
        partitioners={"train": make_partitioner(settings, num_partitions, partition_by=spec.label_column)},
        preprocessor=_FractionAndShuffle(
            spec.label_column, settings.data_fraction, settings.seed, settings.server_fraction
        ),
    )
    # Prepare the dataset here, so that a missing one is a one-line error.
    _load_split(fds, settings.dataset, settings.data_dir, "train", [spec.label_column, "index"])
    return tuple(
        np.asarray(fds.load_partition(pid).with_format("numpy", columns=["index"])[:]["index"], dtype=np.int64)
        for pid in range(num_partitions)
    )


def standardize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> float32 standardised per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def random_crop_flip(images: torch.Tensor, padding: int = AUGMENT_PADDING) -> torch.Tensor:
    """Random crop of the zero-padded images back to their size, then a random horizontal flip.

    One crop offset and one flip coin per image, drawn from torch's global
    generator (so ``torch.manual_seed`` makes them repeatable); a single gather.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (n, 2))
    flip = torch.rand(n) < 0.5
    rows = offsets[:, :1] + torch.arange(h)
    cols = torch.where(flip[:, None], torch.arange(w - 1, -1, -1), torch.arange(w)) + offsets[:, 1:]
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class AugmentedImages(TorchDataset):
    """uint8 images and labels served as ``(standardised float image, label)``.

    With ``augment`` every draw applies :func:`random_crop_flip` first. Batched
    loading (``DataLoader`` calls ``__getitems__``) augments a batch at once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = True,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images, self.labels = images, labels
        self.mean, self.std, self.augment = tuple(mean), tuple(std), augment

    def __len__(self) -> int:
        return len(self.labels)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.augment:
            images = random_crop_flip(images)
        return standardize(images, self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._prepare(self.images[index].unsqueeze(0))[0], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return list(zip(self._prepare(self.images[idx]), self.labels[idx], strict=True))
