"""Local copies of the Hub's image datasets, with random pixels: tests and benchmarks without the network.

Writes the layout and schema of ``uoft-cs/cifar10`` (``plain_text/``, ``img`` and
``label``), ``uoft-cs/cifar100`` (``cifar100/``, ``img``, ``fine_label`` and a
``coarse_label`` that differs from it) and ``zh-plus/tiny-imagenet``
(``data/``, 64x64 ``image``, ``label``; held-out split ``valid`` named by the
Hub's README) with ``datasets`` itself, so that ``data-dir`` pointing at it
takes the Hub's code path (FederatedDataset -> datasets.load_dataset); only the
source differs.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from PIL import Image as PILImage

from .hub_images import HUB_DATASETS

CONFIG_FOLDER = {"cifar10": "plain_text", "cifar100": "cifar100", "tiny-imagenet": "data"}
HELD_OUT_FILE = {"cifar10": "test", "cifar100": "test", "tiny-imagenet": "valid"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tiny-imagenet": 200}
TINY_IMAGENET_README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: valid
    path: data/valid-*
---
"""


def _features(dataset: str) -> datasets.Features:
    if dataset == "cifar10":
        return datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])})
    if dataset == "tiny-imagenet":
        return datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"n{i:08d}" for i in range(200)])}
        )
    return datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=[f"f{i}" for i in range(100)]),
            "coarse_label": datasets.ClassLabel(names=[f"c{i}" for i in range(20)]),
        }
    )


def write_hub_copy(
    folder: Path, dataset: str, n_train: int, n_test: int, seed: int = 0, readme: bool = True
) -> dict[str, dict[str, np.ndarray]]:
    """Write ``<folder>/<config>/{train,<held-out>}-00000-of-00001.parquet`` in the Hub's schema: random pixels,
    balanced labels in a seeded order.

    Returns the written pixels (N, S, S, 3) and labels per split ("test": the
    held-out split). TinyImageNet's held-out file is ``valid-*`` with the Hub's
    README; without it (``readme`` false) the copy is one exported under
    ``datasets``' usual split name, ``validation-*``.
    """
    rng = np.random.default_rng(seed)
    if dataset == "tiny-imagenet" and readme:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "README.md").write_text(TINY_IMAGENET_README)
    size = HUB_DATASETS[dataset].image_size
    (folder / CONFIG_FOLDER[dataset]).mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        pixels = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % NUM_CLASSES[dataset])
        columns = {HUB_DATASETS[dataset].image_column: [PILImage.fromarray(p) for p in pixels]}
        if dataset != "cifar100":
            columns["label"] = labels.tolist()
        else:
            columns["fine_label"] = labels.tolist()
            columns["coarse_label"] = ((labels + 7) % 20).tolist()  # differs from fine_label
        table = datasets.Dataset.from_dict(columns, features=_features(dataset))
        file = HELD_OUT_FILE[dataset] if split == "test" else split
        if file == "valid" and not readme:
            file = "validation"
        table.to_parquet(str(folder / CONFIG_FOLDER[dataset] / f"{file}-00000-of-00001.parquet"))
        written[split] = {"pixels": pixels, "labels": labels}
    return written
