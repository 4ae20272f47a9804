"""Datasets and federated partitions, one module per source, one dispatch here.

* :mod:`.settings`: ``DataSettings`` (everything that determines a node's
  partition; identical on all nodes), the dataset names, ``DataUnavailableError``;
* :mod:`.partitioning`: flwr-datasets partitioners, the seeded ``data-fraction``
  subset and the server slice (``server-data-fraction``), for every dataset;
* :mod:`.fashion_mnist`: the IDX files (Debian's package, ``data-dir`` or torchvision's download);
* :mod:`.hub_images`: CIFAR-10/100 through ``FederatedDataset`` (Hub or a local copy), augmentation;
* :mod:`.wikitext`: WikiText-2 text, word vocabulary, token windows, ``iid``/``contiguous`` partitions.

Each source module answers ``partition_indices``, ``training_examples``,
``test_set`` and ``server_set``; the functions below pick the source by
``settings.dataset``. Partitions are deterministic by seed and identical on
every node that computes them. ``server-data-fraction`` holds a seeded
fraction of the (``data-fraction``) training subset out for the server: those
examples are in no partition, for every method, and :func:`load_server_set`
returns them (FedDF distils on them without labels).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from types import ModuleType

import numpy as np
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

from . import fashion_mnist, hub_images, wikitext
from .cache import cached_partitions
from .hub_images import HUB_DATASETS
from .settings import (
    DATASETS,
    IN_CHANNELS,
    NUM_CLASSES,
    PARTITIONERS,
    TEXT_DATASETS,
    TEXT_PARTITIONERS,
    DataSettings,
    DataUnavailableError,
    PartitionError,
    one_line,
)

__all__ = [
    "DATASETS", "HUB_DATASETS", "IN_CHANNELS", "NUM_CLASSES", "PARTITIONERS", "TEXT_DATASETS", "TEXT_PARTITIONERS",
    "DataSettings", "DataUnavailableError", "MIN_PARTITION_SIZE", "PartitionError", "check_partitions",
    "load_partition", "load_server_set", "load_test_set", "model_kwargs", "partition_indices",
]  # fmt: skip


def source(settings: DataSettings) -> ModuleType:
    """The module that reads ``settings.dataset``."""
    if settings.dataset in TEXT_DATASETS:
        return wikitext
    if settings.dataset in HUB_DATASETS:
        return hub_images
    return fashion_mnist


@lru_cache(maxsize=4)
def partition_indices(settings: DataSettings, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Training-example indices of every partition (for text: training-sequence numbers).

    The server slice (``settings.server_fraction``) is never in any partition.
    Sources that can fingerprint their files (``data_fingerprint``) keep the
    result on disk (:mod:`.cache`), so a fresh process does not partition again.
    """
    module = source(settings)
    fingerprint = getattr(module, "data_fingerprint", None)
    if fingerprint is None:
        return module.partition_indices(settings, num_partitions)
    return cached_partitions(
        settings, num_partitions, fingerprint(settings), lambda: module.partition_indices(settings, num_partitions)
    )


MIN_PARTITION_SIZE = 2
"""Training examples a partition needs at least: BatchNorm on batch statistics trains on batches of two or more."""


def check_partitions(settings: DataSettings, num_partitions: int) -> list[int]:
    """The size of every partition, or :class:`PartitionError` when they cannot be made or one is too small.

    The server runs this once before the first round with the number of
    partitions its nodes report, so that a partitioning the participants would
    fail on is a one-line error at start, not an error reply per participant
    and round. :class:`DataUnavailableError` passes through (no data to check).
    """
    what = (
        f"{num_partitions} {settings.partitioner!r} partitions of {settings.dataset} (data-fraction {settings.data_fraction:g}"
        + (f", dirichlet-alpha {settings.dirichlet_alpha:g}" if settings.partitioner == "dirichlet" else "")
        + (f", classes-per-partition {settings.classes_per_partition}" if settings.partitioner == "pathological" else "")
        + ")"
    )
    try:
        with warnings.catch_warnings():  # flwr-datasets warns on every failed attempt; the error below says it once
            warnings.simplefilter("ignore", UserWarning)
            sizes = [len(p) for p in partition_indices(settings, num_partitions)]
    except DataUnavailableError:
        raise
    except Exception as exc:  # flwr-datasets' partitioners raise ValueError/AssertionError/... on impossible settings
        raise PartitionError(
            f"cannot make {what}: {one_line(exc)}; raise data-fraction, use fewer partitions (num-supernodes), "
            + ("raise dirichlet-alpha, " if settings.partitioner == "dirichlet" else "")
            + "or set partitioner='iid'"
        ) from None
    smallest = min(range(num_partitions), key=sizes.__getitem__)
    if sizes[smallest] < MIN_PARTITION_SIZE:
        raise PartitionError(
            f"{what}: partition {smallest} holds {sizes[smallest]} training example(s) of {sum(sizes)}, at least "
            f"{MIN_PARTITION_SIZE} are needed to train; raise data-fraction or use fewer partitions (num-supernodes)"
            + ("" if settings.partitioner == "iid" else ", or set partitioner='iid'")
        )
    return sizes


def load_partition(settings: DataSettings, partition_id: int, num_partitions: int) -> TorchDataset:
    """The training examples of one participant (augmented for CIFAR; token windows for text)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside [0, {num_partitions})")
    return source(settings).training_examples(settings, partition_indices(settings, num_partitions)[partition_id])


def load_test_set(settings: DataSettings) -> TensorDataset:
    """The held-out test set the server evaluates the global model on (its first ``test_examples``, if set)."""
    test_set = source(settings).test_set(settings)
    if settings.test_examples:
        return TensorDataset(*test_set[: settings.test_examples])
    return test_set


def load_server_set(settings: DataSettings) -> TensorDataset:
    """The server's held-out slice of the training set, without augmentation.

    Images are normalised as the test set's; the labels are in the dataset
    (a ``TensorDataset`` of images and labels) but FedDF's distillation never
    reads them. Empty when ``server_fraction == 0``. For text: the held-out
    training sequences (``TensorDataset(x, y)``).
    """
    return source(settings).server_set(settings)


def model_kwargs(settings: DataSettings) -> dict[str, int]:
    """The model constructor arguments the data fixes.

    Images: ``num_classes`` and ``in_channels``. Text: ``vocab_size`` (the
    vocabulary's entries, special tokens included; this loads the training
    text) and ``max_len`` (``settings.seq_len``).
    """
    dataset = settings.dataset
    if dataset in TEXT_DATASETS:
        return {"vocab_size": wikitext.vocabulary_size(settings), "max_len": settings.seq_len}
    if dataset not in NUM_CLASSES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    return {"num_classes": NUM_CLASSES[dataset], "in_channels": IN_CHANNELS[dataset]}
