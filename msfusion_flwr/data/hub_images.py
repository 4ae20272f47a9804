"""CIFAR-10, CIFAR-100 and TinyImageNet through flwr-datasets' ``FederatedDataset``.

From the Hugging Face Hub (``uoft-cs/cifar10``, ``uoft-cs/cifar100``,
``zh-plus/tiny-imagenet``), or, when ``data-dir`` is set, from a local folder in
the Hub's format (parquet files with the Hub's columns: ``img`` and ``label``
for CIFAR-10, ``img``, ``fine_label`` and ``coarse_label`` for CIFAR-100,
``image`` and ``label`` for TinyImageNet; a snapshot of the Hub repository
works as is). CIFAR's held-out split is ``test``; TinyImageNet's labelled
held-out split is ``valid`` (``validation`` in a copy exported under that
name), its 200 classes' 10,000 images, and serves as its test set. The
``FederatedDataset`` applies the partitioner to the training split after a
preprocessor keeps the seeded ``data-fraction`` subset (less the server slice)
and shuffles it with the seed. Training partitions are augmented (random crop
of the zero-padded image back to its size, 4 pixels of padding at 32x32, 8 at
64x64, and a random horizontal flip) every time an example is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

from .partitioning import make_partitioner, server_split
from .settings import DataSettings, DataUnavailableError, one_line


@dataclass(frozen=True)
class HubImageDataset:
    """An image-classification dataset on the Hugging Face Hub and how to read it."""

    hub_id: str
    label_column: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_column: str = "img"
    image_size: int = 32
    test_splits: tuple[str, ...] = ("test",)
    """The held-out split the server evaluates on: the first of these names the copy has."""

    @property
    def padding(self) -> int:
        """Zero padding of the random-crop augmentation: an eighth of the image side."""
        return self.image_size // 8


HUB_DATASETS = {
    "cifar10": HubImageDataset(
        "uoft-cs/cifar10", "label", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": HubImageDataset(
        "uoft-cs/cifar100", "fine_label", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
    "tiny-imagenet": HubImageDataset(
        "zh-plus/tiny-imagenet", "label", (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821),
        image_column="image", image_size=64, test_splits=("valid", "validation"),
    ),
}  # fmt: skip
"""Datasets loaded through ``FederatedDataset``; mean and std are the training split's per channel."""
AUGMENT_PADDING = 4
TEST = "test"
"""The name callers use for a dataset's held-out split, whatever the copy calls it."""


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
    names = spec.test_splits if split == TEST else (split,)
    try:
        table = _first_split(fds, names)
    except Exception as exc:  # network, missing files, missing split: all mean "no data here"
        hint = "" if data_dir else "; set data-dir to a local copy in the Hub's parquet format"
        message = f"{dataset} could not be loaded from {where} ({one_line(exc)}){hint}"
        raise DataUnavailableError(message) from None
    missing = set(columns) - set(table.column_names)
    if missing:
        raise DataUnavailableError(
            f"{dataset} split {split!r} from {where} lacks column(s) {sorted(missing)} "
            f"(has {table.column_names})"
        )
    return table


def _first_split(fds: Any, names: Sequence[str]) -> Any:
    """``fds.load_split`` of the first of ``names`` the source has; the first name's error if none."""
    errors = []
    for name in names:
        try:
            return fds.load_split(name)
        except Exception as exc:  # a copy without the Hub's split names: try the next
            errors.append(exc)
    raise errors[0]


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
        padding: int = AUGMENT_PADDING,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images, self.labels = images, labels
        self.mean, self.std, self.augment, self.padding = tuple(mean), tuple(std), augment, padding

    def __len__(self) -> int:
        return len(self.labels)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.augment:
            images = random_crop_flip(images, self.padding)
        return standardize(images, self.mean, self.std)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._prepare(self.images[index].unsqueeze(0))[0], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return list(zip(self._prepare(self.images[idx]), self.labels[idx], strict=True))


def partition_indices(settings: DataSettings, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Training-example indices (rows of the train split) of every partition."""
    return _hub_partition_indices(settings, num_partitions)


def training_examples(settings: DataSettings, rows: np.ndarray) -> AugmentedImages:
    """The training images ``rows``, augmented at every draw."""
    spec = HUB_DATASETS[settings.dataset]
    images, labels = load_hub_split(settings.dataset, settings.data_dir, "train")
    idx = torch.from_numpy(rows)
    return AugmentedImages(images[idx], labels[idx], spec.mean, spec.std, padding=spec.padding)


def test_set(settings: DataSettings) -> TensorDataset:
    """The test split, standardised."""
    spec = HUB_DATASETS[settings.dataset]
    images, labels = load_hub_split(settings.dataset, settings.data_dir, TEST)
    return TensorDataset(standardize(images, spec.mean, spec.std), labels)


def server_set(settings: DataSettings) -> TensorDataset:
    """The server's held-out training images, standardised, not augmented."""
    spec = HUB_DATASETS[settings.dataset]
    images, labels = load_hub_split(settings.dataset, settings.data_dir, "train")
    _, held = server_split(len(labels), settings.data_fraction, settings.server_fraction, settings.seed)
    idx = torch.from_numpy(held)
    return TensorDataset(standardize(images[idx], spec.mean, spec.std), labels[idx])
