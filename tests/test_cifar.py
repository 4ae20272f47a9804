"""CIFAR-10/100 and TinyImageNet through flwr-datasets' FederatedDataset, on tiny local copies in the Hub's format.

The Hub repositories ``uoft-cs/cifar10`` and ``uoft-cs/cifar100`` hold parquet
files under ``plain_text/`` and ``cifar100/``; their columns are ``img``
(Image) and ``label`` (ClassLabel, 10 names), resp. ``img``, ``fine_label``
(100 names) and ``coarse_label`` (20 names). ``zh-plus/tiny-imagenet`` holds
``data/train-*.parquet`` and ``data/valid-*.parquet`` (64x64 ``image``,
``label`` with 200 names), its README's ``configs`` naming the splits
``train`` and ``valid``. The fixtures write the same layout and schema with
``datasets`` itself, and ``data-dir`` points at it: the code path is the Hub's
one (FederatedDataset -> datasets.load_dataset), only the source differs.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import datasets
import flwr_datasets
import numpy as np
import pytest
import torch
from flwr_datasets.common import telemetry
from torch.utils.data import DataLoader

from msfusion_flwr import data as data_mod
from msfusion_flwr.data import (
    HUB_DATASETS,
    DataSettings,
    DataUnavailableError,
    load_partition,
    load_test_set,
    model_kwargs,
    partition_indices,
)
from msfusion_flwr.data import hub_copy
from msfusion_flwr.data.hub_images import AugmentedImages, load_hub_split, random_crop_flip, standardize
from msfusion_flwr.data.partitioning import server_split, training_subset

N_TRAIN = {"cifar10": 120, "cifar100": 600, "tiny-imagenet": 800}  # enough per class for Dirichlet's min size
N_TEST = 20


def write_hub_copy(folder: Path, dataset: str, seed: int = 0, readme: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """The package's Hub-layout writer at this file's sizes."""
    return hub_copy.write_hub_copy(folder, dataset, N_TRAIN[dataset], N_TEST, seed, readme)


@pytest.fixture(scope="module")
def hub_copies(tmp_path_factory) -> dict[str, tuple[str, dict]]:
    root = tmp_path_factory.mktemp("hub")
    return {
        name: (str(root / name), write_hub_copy(root / name, name, seed=i)) for i, name in enumerate(HUB_DATASETS)
    }


@pytest.fixture(autouse=True)
def isolate(tmp_path, monkeypatch):
    """Fresh caches, an empty datasets cache folder, no telemetry requests."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")
    load_hub_split.cache_clear()
    partition_indices.cache_clear()
    yield
    load_hub_split.cache_clear()
    partition_indices.cache_clear()


def as_chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dataset", list(HUB_DATASETS))
def test_test_set_is_the_written_test_split(hub_copies, dataset):
    """load_test_set: (3, S, S) float32 standardised with the dataset's mean/std and the labels
    (fine labels for CIFAR-100), in file order; the train split's pixels come back exactly."""
    folder, written = hub_copies[dataset]
    spec = HUB_DATASETS[dataset]
    size = spec.image_size
    x, y = load_test_set(DataSettings(dataset=dataset, data_dir=folder)).tensors
    assert x.shape == (N_TEST, 3, size, size) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert y.tolist() == written["test"]["labels"].tolist()
    assert torch.equal(x, standardize(as_chw(written["test"]["pixels"]), spec.mean, spec.std))
    images, labels = load_hub_split(dataset, folder, "train")
    assert images.dtype == torch.uint8 and images.shape == (N_TRAIN[dataset], 3, size, size)
    assert torch.equal(images, as_chw(written["train"]["pixels"]))
    assert labels.tolist() == written["train"]["labels"].tolist()


def test_loading_goes_through_federated_dataset(hub_copies, monkeypatch):
    """Both the split loader and the partitioner run inside flwr-datasets' FederatedDataset, given data-dir."""
    folder, _ = hub_copies["cifar10"]
    seen = []
    real = flwr_datasets.FederatedDataset

    def spy(**kwargs):
        seen.append((kwargs["dataset"], set(kwargs.get("partitioners", {}))))
        return real(**kwargs)

    monkeypatch.setattr(flwr_datasets, "FederatedDataset", spy)
    load_partition(DataSettings(dataset="cifar10", data_dir=folder, partitioner="iid"), 0, 2)
    assert sorted(seen, key=lambda call: len(call[1])) == [(folder, set()), (folder, {"train"})]


def assert_disjoint(parts, n_total: int) -> set[int]:
    seen: set[int] = set()
    for part in parts:
        assert part.dtype == np.int64
        values = part.tolist()
        assert len(values) == len(set(values))
        assert all(0 <= v < n_total for v in values)
        assert seen.isdisjoint(values)
        seen.update(values)
    return seen


@pytest.mark.parametrize(
    "dataset,partitioner", list(itertools.product(HUB_DATASETS, ["iid", "dirichlet", "pathological"]))
)
def test_partitions_disjoint_complete_deterministic(hub_copies, dataset, partitioner):
    """Partitions of the train split are disjoint, cover it (iid, Dirichlet), repeat for the same seed,
    and load_partition returns exactly their examples with their (fine) labels."""
    folder, written = hub_copies[dataset]
    settings = DataSettings(
        dataset=dataset,
        data_dir=folder,
        partitioner=partitioner,
        dirichlet_alpha=1.0,
        classes_per_partition=2,
        seed=3,
    )
    n_train = N_TRAIN[dataset]
    parts = partition_indices(settings, 3)
    covered = assert_disjoint(parts, n_train)
    labels = written["train"]["labels"]
    if partitioner == "pathological":  # partition i holds classes i, i+1 (deterministic assignment)
        assert covered == {i for i in range(n_train) if labels[i] in {0, 1, 2, 3}}
        for pid, part in enumerate(parts):
            assert set(labels[part].tolist()) <= {pid, pid + 1}
    else:
        assert covered == set(range(n_train))
    partition_indices.cache_clear()
    load_hub_split.cache_clear()
    again = partition_indices(DataSettings(**settings.__dict__), 3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    for pid, part in enumerate(parts):
        ds = load_partition(settings, pid, 3)
        assert isinstance(ds, AugmentedImages) and len(ds) == len(part)
        assert ds.labels.tolist() == labels[part].tolist()
        assert torch.equal(ds.images, as_chw(written["train"]["pixels"][part]))
    with pytest.raises(ValueError):
        load_partition(settings, 3, 3)


def test_dirichlet_partitions_depend_on_seed(hub_copies):
    folder, _ = hub_copies["cifar10"]

    def parts(seed: int):
        s = DataSettings(
            dataset="cifar10", data_dir=folder, partitioner="dirichlet", dirichlet_alpha=1.0, seed=seed
        )
        return [sorted(p.tolist()) for p in partition_indices(s, 3)]

    assert parts(0) != parts(1)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_data_fraction_keeps_seeded_subset(hub_copies, fraction):
    """data-fraction keeps round(f * N) training examples, the same ones for the same seed."""
    folder, _ = hub_copies["cifar100"]
    n_train = N_TRAIN["cifar100"]

    def kept(seed: int) -> set[int]:
        s = DataSettings(dataset="cifar100", data_dir=folder, partitioner="iid", data_fraction=fraction, seed=seed)
        return assert_disjoint(partition_indices(s, 2), n_train)

    first = kept(5)
    assert len(first) == round(fraction * n_train)
    partition_indices.cache_clear()
    assert kept(5) == first
    assert kept(6) != first
    assert set(training_subset(n_train, fraction, 5).tolist()) == first


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_server_slice_is_held_out_of_the_partitions(hub_copies, partitioner):
    """server-data-fraction: a seeded slice of the data-fraction subset, in no partition, served unaugmented
    (standardised pixels and labels of its rows); the partitions cover the rest."""
    folder, written = hub_copies["cifar10"]
    spec = HUB_DATASETS["cifar10"]
    base = {"dataset": "cifar10", "data_dir": folder, "partitioner": partitioner, "dirichlet_alpha": 1.0, "seed": 3}
    settings = DataSettings(**base, data_fraction=0.5, server_fraction=0.25)
    pool, held = server_split(N_TRAIN["cifar10"], 0.5, 0.25, 3)
    assert len(held) == round(0.25 * 60) and set(pool) | set(held) == set(training_subset(120, 0.5, 3))
    covered = assert_disjoint(partition_indices(settings, 3), N_TRAIN["cifar10"])
    assert covered == set(pool.tolist()) and not covered & set(held.tolist())
    x, y = data_mod.load_server_set(settings).tensors
    assert torch.equal(x, standardize(as_chw(written["train"]["pixels"][held]), spec.mean, spec.std))
    assert y.tolist() == written["train"]["labels"][held].tolist()
    assert len(data_mod.load_server_set(DataSettings(**base))) == 0
    assert assert_disjoint(partition_indices(DataSettings(**base), 3), N_TRAIN["cifar10"]) == set(range(120))


def test_augmentation_changes_images_keeps_shape_and_follows_manual_seed(hub_copies):
    """Training examples are random crops (4-pixel zero padding) and flips of the stored image, standardised;
    the draws follow torch.manual_seed; batches come through DataLoader with the right shapes."""
    folder, _ = hub_copies["cifar10"]
    spec = HUB_DATASETS["cifar10"]
    ds = load_partition(DataSettings(dataset="cifar10", data_dir=folder, partitioner="iid"), 0, 2)
    plain = standardize(ds.images, spec.mean, spec.std)
    torch.manual_seed(0)
    first = torch.stack([ds[i][0] for i in range(len(ds))])
    torch.manual_seed(0)
    second = torch.stack([ds[i][0] for i in range(len(ds))])
    assert first.shape == plain.shape and first.dtype == torch.float32
    assert torch.equal(first, second)
    changed = [not torch.equal(first[i], plain[i]) for i in range(len(ds))]
    assert sum(changed) > len(ds) // 2
    assert ds[0][1] == ds.labels[0]
    torch.manual_seed(1)
    x, y = next(iter(DataLoader(ds, batch_size=8, shuffle=False)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(y, ds.labels[:8])
    assert not torch.equal(x, plain[:8])
    unaugmented = AugmentedImages(ds.images, ds.labels, spec.mean, spec.std, augment=False)
    assert torch.equal(unaugmented[3][0], plain[3])


def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
    """Every output is the 32x32 window at some offset in [0, 8]^2 of the zero-padded image, possibly mirrored."""
    torch.manual_seed(0)
    images = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = random_crop_flip(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for i in range(len(images)):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, dy : dy + 32, dx : dx + 32]))
        ]
        assert len(matches) == 1
        flips += matches[0][2]
    assert 0 < flips < len(images)


def test_unreachable_hub_without_data_dir_is_one_line_error(offline_hub, monkeypatch, tmp_path):
    """No data-dir and no Hub (offline, nothing cached): one-line DataUnavailableError naming the Hub id."""
    for dataset in HUB_DATASETS:
        settings = DataSettings(dataset=dataset)
        for load in (lambda: load_test_set(settings), lambda: load_partition(settings, 0, 2)):
            with pytest.raises(DataUnavailableError) as info:
                load()
            message = str(info.value)
            assert "\n" not in message
            assert HUB_DATASETS[dataset].hub_id in message and "data-dir" in message


@pytest.mark.parametrize("content", ["missing", "empty", "no-label"])
def test_bad_data_dir_is_one_line_error(tmp_path, content):
    """A data-dir that is missing, empty, or lacks the label column: one-line DataUnavailableError."""
    folder = tmp_path / "copy"
    if content != "missing":
        folder.mkdir()
    if content == "no-label":  # a CIFAR-10 copy read as CIFAR-100 has no fine_label
        write_hub_copy(folder, "cifar10")
    settings = DataSettings(dataset="cifar100", data_dir=str(folder))
    with pytest.raises(DataUnavailableError) as info:
        load_test_set(settings)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    if content == "no-label":
        assert "fine_label" in str(info.value)


def test_tiny_imagenet_copy_without_the_hubs_split_names_is_read_too(tmp_path):
    """A copy of TinyImageNet whose held-out split is named ``validation`` (not the Hub's ``valid``):
    it is still the test set; the augmentation pads 64x64 images by 8."""
    written = write_hub_copy(tmp_path / "copy", "tiny-imagenet", readme=False)
    settings = DataSettings(dataset="tiny-imagenet", data_dir=str(tmp_path / "copy"), partitioner="iid")
    _, y = load_test_set(settings).tensors
    assert y.tolist() == written["test"]["labels"].tolist()
    assert load_partition(settings, 0, 2).padding == 8 == HUB_DATASETS["tiny-imagenet"].padding


def test_model_kwargs():
    assert model_kwargs(DataSettings(dataset="fashion-mnist")) == {"num_classes": 10, "in_channels": 1}
    assert model_kwargs(DataSettings(dataset="cifar10")) == {"num_classes": 10, "in_channels": 3}
    assert model_kwargs(DataSettings(dataset="cifar100")) == {"num_classes": 100, "in_channels": 3}
    assert model_kwargs(DataSettings(dataset="tiny-imagenet")) == {"num_classes": 200, "in_channels": 3}
    with pytest.raises(ValueError):
        model_kwargs(DataSettings(dataset="mnist"))


def test_cifar100_preresnet18_runs_through_the_simulation_engine(hub_copies, tmp_path, monkeypatch):
    """PreResNet-18 sub-models (r = 0.25) on a local CIFAR-100 copy, 1 round, 2 participants, end to end."""
    from msfusion_flwr.apps import run_experiment
    from msfusion_flwr.server.reporting import MODEL_FILE, read_metrics

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # inherited by the Ray workers
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    out = run_experiment(
        {
            "dataset": "cifar100",
            "model": "preresnet18",
            "data-dir": hub_copies["cifar100"][0],
            "partitioner": "iid",
            "num-server-rounds": 1,
            "batch-size": 16,
            "min-available-nodes": 2,
            "output-dir": str(tmp_path / "run"),
        },
        num_supernodes=2,
    )
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["participants"] == [0, 1] and rows[1]["failures"] == []
    assert rows[1]["accuracy"] is not None and rows[1]["flops_max"] > 0
    state = torch.load(out / MODEL_FILE)
    assert state["head.weight"].shape == (100, 256)  # msfusion's default 2-block global model (half of 512), 100 classes


def test_tiny_imagenet_torchvision_resnet18_runs_through_the_simulation_engine(hub_copies, tmp_path, monkeypatch):
    """The paper's third image dataset with the paper's model: torchvision's ResNet-18 (width groups derived)
    on a local TinyImageNet copy, r = 0.25, 1 round, 2 participants; 200 classes in the fused model."""
    from msfusion_flwr.apps import run_experiment
    from msfusion_flwr.server.reporting import MODEL_FILE, read_metrics

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # inherited by the Ray workers
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    out = run_experiment(
        {
            "dataset": "tiny-imagenet", "model": "torchvision:resnet18", "data-dir": hub_copies["tiny-imagenet"][0],
            "partitioner": "iid", "num-server-rounds": 1, "batch-size": 16, "min-available-nodes": 2,
            "output-dir": str(tmp_path / "run"),
        },
        num_supernodes=2,
    )  # fmt: skip
    rows = read_metrics(out)
    assert rows[1]["participants"] == [0, 1] and rows[1]["failures"] == []
    assert torch.load(out / MODEL_FILE)["net.fc.weight"].shape == (200, 256)  # 2 blocks of 128 (msfusion's default)
