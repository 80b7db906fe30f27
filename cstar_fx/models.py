"""Model builders: torchvision classifiers with a CIFAR or ImageNet stem, and small CNNs for demos.

Inputs live in [0, 1]; normalisation is the model's first layer, so attacks see pixel space.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torchvision
from .errors import CstarValueError

__all__ = ["Normalize", "build_model", "cifar_resnet18", "small_cnn", "TORCHVISION_NAMES"]

TORCHVISION_NAMES = ("resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2", "vit_b_16")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as a module so that attacks work in [0, 1] pixel space.

    Example:
        >>> Normalize((0.5,), (0.5,))(torch.ones(1, 1, 2, 2)).unique().tolist()
        [1.0]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _cifar_stem(model: nn.Module, name: str) -> nn.Module:
    if name.startswith("resnet"):
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif name == "mobilenet_v2":
        first = model.features[0][0]
        model.features[0][0] = nn.Conv2d(3, first.out_channels, 3, 1, 1, bias=False)
    elif name.startswith("vgg"):
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Linear(512, model.classifier[-1].out_features))
    return model


def build_model(name: str, *, num_classes: int = 10, stem: str = "cifar", normalize: bool = True) -> nn.Module:
    """A randomly initialised torchvision classifier (no weights are ever downloaded).

    ``stem="cifar"`` adapts the first layers to 32x32 inputs (3x3 stride-1 stem, no max-pool for
    ResNets); ``stem="imagenet"`` keeps the 224x224 design. ``normalize`` prepends CIFAR mean/std.

    Example:
        >>> m = build_model("resnet18")
        >>> m(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if name not in TORCHVISION_NAMES:
        raise CstarValueError(f"unknown model {name!r}; choose one of {', '.join(TORCHVISION_NAMES)}")
    if stem not in ("cifar", "imagenet"):
        raise CstarValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    if name == "vit_b_16":
        if stem == "cifar":
            raise CstarValueError("vit_b_16 needs stem='imagenet' (224x224 inputs)")
        model = torchvision.models.vit_b_16(weights=None, num_classes=num_classes)
    else:
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if stem == "cifar":
        model = _cifar_stem(model, name)
    if normalize:
        model = nn.Sequential(OrderedDict(normalize=Normalize(CIFAR_MEAN, CIFAR_STD), net=model))
    return model


def cifar_resnet18(num_classes: int = 10, width: int = 64) -> nn.Module:
    """ResNet-18 for 32x32 inputs with input normalisation (the paper's CIFAR-10 model).

    ``width`` is the first stage's channel count (stages have ``width``, 2x, 4x, 8x); 64 is the
    standard ResNet-18, narrower ones (e.g. 16) train on a CPU. Module names match torchvision's.

    Example:
        >>> sum(p.numel() for p in cifar_resnet18().parameters())
        11173962
        >>> sum(p.numel() for p in cifar_resnet18(width=16).parameters())
        701466
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise CstarValueError(f"width must be an int >= 1 (64 for the standard ResNet-18), got {width!r}")
    model = build_model("resnet18", num_classes=num_classes, stem="cifar")
    if width == 64:
        return model
    net = model.net
    # torchvision's stage builder takes any width; only its 64-channel defaults are fixed in __init__.
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    block = torchvision.models.resnet.BasicBlock
    for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        setattr(net, name, net._make_layer(block, width * 2 ** i, 2, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(8 * width, num_classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> nn.Module:
    """A small CNN for 8x8 digits (and tests): three 3x3 convs and a linear head.

    Example:
        >>> small_cnn()(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 4 * w), nn.ReLU(), nn.Linear(4 * w, num_classes),
    )
