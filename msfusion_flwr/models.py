"""Models with declared width groups, buildable at any width.

Every model here

* takes ``widths`` (group name -> units) and ``rate`` (the participant's split
  ratio) so that a participant builds a real narrow instance of the same
  architecture, whose state dict has exactly the sliced tensors' shapes;
* exposes ``features(x)`` (the representation used by the contrastive loss)
  and ``classify(z)``; ``forward = classify(features(x))``;
* declares its width groups in ``width_group_decls()`` and names the group that
  indexes its representation in ``feature_group``.

Sliced training needs normalisation that does not depend on the width the
global model is evaluated at: BatchNorm uses batch statistics (no running
stats, as HeteroFL's static BN) and a :class:`Scaler` divides activations by
the rate during training (HeteroFL), also on the classifier's input.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .splitting import GroupDecl


class Scaler(nn.Module):
    """Divide activations by the sub-model's width ratio while training (HeteroFL).

    A width-``r`` slice sums over ``r`` times fewer inputs than the full model;
    scaling by ``1/r`` in training keeps the next layer's pre-activations at
    the scale the full model sees at evaluation, where the scaler is identity.
    """

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        return x / self.rate if self.training else x

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def _conv_block(cin: int, cout: int, rate: float, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        Scaler(rate),
        nn.BatchNorm2d(cout, track_running_stats=False),
        nn.ReLU(inplace=True),
    ]


class FashionCNN(nn.Module):
    """Three 3x3 conv blocks (the first with stride 2) and a hidden linear layer for 28x28 images.

    Width groups: ``conv1``, ``conv2``, ``conv3`` (channels) and ``fc`` (hidden
    units, the representation). The input channel and the classes are never split.
    """

    FULL_WIDTHS = {"conv1": 64, "conv2": 128, "conv3": 256, "fc": 512}
    feature_group = "fc"

    def __init__(
        self,
        widths: Mapping[str, int] | None = None,
        rate: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        w = {**self.FULL_WIDTHS, **(widths or {})}
        self.conv1 = nn.Sequential(*_conv_block(in_channels, w["conv1"], rate, stride=2))
        self.conv2 = nn.Sequential(*_conv_block(w["conv1"], w["conv2"], rate), nn.MaxPool2d(2))
        self.conv3 = nn.Sequential(*_conv_block(w["conv2"], w["conv3"], rate), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(w["conv3"], w["fc"])
        self.fc_scaler = Scaler(rate)
        self.fc_norm = nn.BatchNorm1d(w["fc"], track_running_stats=False)
        self.head_scaler = Scaler(rate)
        self.head = nn.Linear(w["fc"], num_classes)

    def width_group_decls(self) -> list[GroupDecl]:
        return [
            GroupDecl("conv1", outputs=("conv1.0", "conv1.2"), inputs=("conv2.0",)),
            GroupDecl("conv2", outputs=("conv2.0", "conv2.2"), inputs=("conv3.0",)),
            GroupDecl("conv3", outputs=("conv3.0", "conv3.2"), inputs=("fc",)),
            GroupDecl("fc", outputs=("fc", "fc_norm"), inputs=("head",)),
        ]

    def features(self, x: Tensor) -> Tensor:
        x = self.conv3(self.conv2(self.conv1(x))).flatten(1)
        return nn.functional.relu(self.fc_norm(self.fc_scaler(self.fc(x))))

    def classify(self, z: Tensor) -> Tensor:
        return self.head(self.head_scaler(z))

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))


MODELS: dict[str, type[nn.Module]] = {"cnn": FashionCNN}


def model_class(name: str) -> type[nn.Module]:
    """The model class registered as ``name``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def build_model(
    name: str,
    widths: Mapping[str, int] | None = None,
    rate: float = 1.0,
    **kwargs: int,
) -> nn.Module:
    """Instantiate model ``name`` at ``widths`` (full width when None)."""
    return model_class(name)(widths=widths, rate=rate, **kwargs)
