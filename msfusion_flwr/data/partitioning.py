"""Which training examples each participant gets: flwr-datasets partitioners, the data fraction, the server slice.

Everything here is deterministic by seed, so every node that computes a
partition computes the same one.
"""

from __future__ import annotations

import numpy as np

from .settings import PARTITIONERS, DataSettings


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
