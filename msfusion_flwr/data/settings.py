"""What determines a node's data, the datasets a run can name, and the one error for missing data."""

from __future__ import annotations

from dataclasses import dataclass

NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}
IN_CHANNELS = {"fashion-mnist": 1, "cifar10": 3, "cifar100": 3, "tiny-imagenet": 3}
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "wikitext-2")
TEXT_DATASETS = ("wikitext-2",)
"""Language-modelling datasets (:mod:`msfusion_flwr.data.wikitext`); the others are image classification."""
PARTITIONERS = ("iid", "dirichlet", "pathological", "contiguous")
"""``contiguous`` is for text only; ``dirichlet`` and ``pathological`` for images only."""
TEXT_PARTITIONERS = ("iid", "contiguous")
"""The partitioners of text datasets."""


class DataUnavailableError(RuntimeError):
    """The dataset could not be found locally nor downloaded."""


class PartitionError(ValueError):
    """The configured partitions cannot be made, or one is too small to train on; one line saying what to change."""


@dataclass(frozen=True)
class DataSettings:
    """Everything that determines a node's partition; identical on all nodes."""

    dataset: str = "fashion-mnist"
    data_dir: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    data_fraction: float = 1.0
    test_examples: int = 0
    """The server evaluates on the test set's first ``test_examples`` examples; 0: all of them."""
    seed: int = 0
    server_fraction: float = 0.0
    seq_len: int = 64
    """Text: tokens per training/test sequence."""
    train_split: str = "train"
    """Text: the split participants train on, ``train`` or ``valid`` (the test split is always ``test``)."""
    vocab_size: int = 0
    """Text: vocabulary entries kept, special tokens included; 0 keeps every training word."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__
