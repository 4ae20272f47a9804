"""Image classifiers with declared width groups, buildable at any width.

Every model here

* takes ``widths`` (group name -> units) and ``rate`` (the participant's split
  ratio) so that a participant builds a real narrow instance of the same
  architecture, whose state dict has exactly the sliced tensors' shapes;
* exposes ``features(x)`` (the representation used by the contrastive loss)
  and ``outputs(x) -> (logits, features)`` (one pass for training);
  ``forward(x)`` returns the logits;
* gets its width groups from its own graph (Torch-Pruning's DependencyGraph,
  :func:`~msfusion_flwr.models.derived.traced_width_groups`) and names them in
  ``GROUP_NAMES`` (the names committed runs and checkpoints use); names the
  group that indexes its representation in ``feature_group``
  (``feature_unit`` channels per group unit) and its kind of input in
  ``input_kind`` (``"image"`` or ``"text"``); ``eval_batch_size`` is its
  server-side evaluation batch.

The language models live in :mod:`msfusion_flwr.models.language`; the registry
that run configs name models by, in :mod:`msfusion_flwr.models.registry`.

Sliced training needs normalisation that does not depend on the width the
global model is evaluated at: BatchNorm uses batch statistics (no running
stats, as HeteroFL's static BN) and a :class:`Scaler` divides activations by
the rate during training (HeteroFL), also on the classifier's input.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import product
from typing import ClassVar

from torch import Tensor, nn

from ..engine.groups import WidthGroup
from .derived import traced_width_groups
from .layers import Scaler, classifier_scaler


def _conv_block(cin: int, cout: int, rate: float, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        Scaler(rate),
        nn.BatchNorm2d(cout, track_running_stats=False),
        nn.ReLU(inplace=True),
    ]


class ImageClassifier(nn.Module):
    """Shared protocol of the image models: ``forward = classify(features(x))``."""

    input_kind = "image"
    feature_unit = 1
    eval_batch_size = 1000
    """Evaluation batch; BatchNorm uses batch statistics, so it is fixed for comparable figures."""

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def classify(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.features(x)
        return self.classify(z), z

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))


class FashionCNN(ImageClassifier):
    """Three 3x3 conv blocks (the first with stride 2) and a hidden linear layer for 28x28 images.

    Width groups: ``conv1``, ``conv2``, ``conv3`` (channels) and ``fc`` (hidden
    units, the representation). The input channel and the classes are never split.
    """

    FULL_WIDTHS = {"conv1": 64, "conv2": 128, "conv3": 256, "fc": 512}
    GROUP_NAMES: ClassVar[Mapping[str, str]] = {"conv1.0": "conv1", "conv2.0": "conv2", "conv3.0": "conv3", "fc": "fc"}
    feature_group = "fc"

    def __init__(
        self,
        widths: Mapping[str, int] | None = None,
        rate: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 1,
        classifier_scaling: bool = True,
    ) -> None:
        super().__init__()
        w = {**self.FULL_WIDTHS, **(widths or {})}
        self.widths, self.in_channels, self.num_classes = w, in_channels, num_classes
        self.conv1 = nn.Sequential(*_conv_block(in_channels, w["conv1"], rate, stride=2))
        self.conv2 = nn.Sequential(*_conv_block(w["conv1"], w["conv2"], rate), nn.MaxPool2d(2))
        self.conv3 = nn.Sequential(*_conv_block(w["conv2"], w["conv3"], rate), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(w["conv3"], w["fc"])
        self.fc_scaler = Scaler(rate)
        self.fc_norm = nn.BatchNorm1d(w["fc"], track_running_stats=False)
        self.head_scaler = classifier_scaler(rate, classifier_scaling)
        self.head = nn.Linear(w["fc"], num_classes)

    def width_groups(self) -> list[WidthGroup]:
        shape = (2, self.in_channels, 28, 28)
        return traced_width_groups(self, shape, in_channels=self.in_channels, num_classes=self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        x = self.conv3(self.conv2(self.conv1(x))).flatten(1)
        return nn.functional.relu(self.fc_norm(self.fc_scaler(self.fc(x))))

    def classify(self, z: Tensor) -> Tensor:
        return self.head(self.head_scaler(z))


class PreActBlock(nn.Module):
    """Pre-activation basic block (HeteroFL's ``Block``): BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus shortcut.

    The shortcut is a 1x1 conv of the pre-activated input when the block changes
    stride or channels, else the identity. Convs have no bias; the scalers sit on
    the conv outputs entering each norm, as in HeteroFL.
    """

    def __init__(self, cin: int, hidden: int, cout: int, stride: int, rate: float) -> None:
        super().__init__()
        self.scaler = Scaler(rate)
        self.n1 = nn.BatchNorm2d(cin, track_running_stats=False)
        self.conv1 = nn.Conv2d(cin, hidden, 3, stride=stride, padding=1, bias=False)
        self.n2 = nn.BatchNorm2d(hidden, track_running_stats=False)
        self.conv2 = nn.Conv2d(hidden, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.n1(self.scaler(x)))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(nn.functional.relu(self.n2(self.scaler(out))))
        return out + shortcut


class PreResNet18(ImageClassifier):
    """HeteroFL/FedRolex pre-activation ResNet-18 for 32x32 images.

    conv3x3 stem -> four stages of two :class:`PreActBlock` (hidden sizes 64,
    128, 256, 512; strides 1, 2, 2, 2) -> BN -> ReLU -> global average pool ->
    linear classifier.

    Width groups (derived from the graph) follow the residual structure: stage ``layerS``'s residual
    stream is one group ``layerS`` (the stem output for ``layer1``; the first
    block's shortcut projection for the others; every block's ``conv2``
    output, and every norm, conv and shortcut reading the stream), so every
    tensor added to the stream is sliced with the same units. Each block's
    inner channels (``conv1`` out, ``n2``, ``conv2`` in) are their own group
    ``layerS.B``. The representation is the pooled ``layer4`` stream after the
    final BN-ReLU (``feature_group = "layer4"``). Input channels and classes
    are never split.
    """

    STAGES = (("layer1", 64, 1), ("layer2", 128, 2), ("layer3", 256, 2), ("layer4", 512, 2))
    BLOCKS_PER_STAGE = 2
    FULL_WIDTHS = {
        "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512,  # residual streams
        "layer1.0": 64, "layer1.1": 64, "layer2.0": 128, "layer2.1": 128,  # block inner channels
        "layer3.0": 256, "layer3.1": 256, "layer4.0": 512, "layer4.1": 512,
    }  # fmt: skip
    GROUP_NAMES: ClassVar[Mapping[str, str]] = {
        "conv1": "layer1", **{f"{stage}.0.conv2": stage for stage, _, _ in STAGES[1:]},  # streams, by first producer
        **{f"{stage}.{b}.conv1": f"{stage}.{b}" for stage, b in product((s for s, _, _ in STAGES), range(BLOCKS_PER_STAGE))},
    }  # fmt: skip
    feature_group = "layer4"

    def __init__(
        self,
        widths: Mapping[str, int] | None = None,
        rate: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 3,
        classifier_scaling: bool = True,
    ) -> None:
        super().__init__()
        w = {**self.FULL_WIDTHS, **(widths or {})}
        self.widths, self.in_channels, self.num_classes = w, in_channels, num_classes
        first = self.STAGES[0][0]
        self.conv1 = nn.Conv2d(in_channels, w[first], 3, stride=1, padding=1, bias=False)
        stream = first
        for stage, _, stride in self.STAGES:
            blocks = []
            for b in range(self.BLOCKS_PER_STAGE):
                cin = w[stream] if b == 0 else w[stage]
                blocks.append(PreActBlock(cin, w[f"{stage}.{b}"], w[stage], stride if b == 0 else 1, rate))
            setattr(self, stage, nn.Sequential(*blocks))
            stream = stage
        self.scaler = Scaler(rate)
        self.n4 = nn.BatchNorm2d(w[stream], track_running_stats=False)
        self.head_scaler = classifier_scaler(rate, classifier_scaling)
        self.head = nn.Linear(w[stream], num_classes)

    def width_groups(self) -> list[WidthGroup]:
        shape = (2, self.in_channels, 32, 32)
        return traced_width_groups(self, shape, in_channels=self.in_channels, num_classes=self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        for stage, _, _ in self.STAGES:
            out = getattr(self, stage)(out)
        out = nn.functional.relu(self.n4(self.scaler(out)))
        return nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)

    def classify(self, z: Tensor) -> Tensor:
        return self.head(self.head_scaler(z))
