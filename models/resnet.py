"""ResNet18 for 32x32 CIFAR images, the model of the BTARD paper's CIFAR-10 experiments."""

from __future__ import annotations

from torch import nn

from lightning_btard.extras import require
from models.classifier import ImageClassifier

__all__ = ["ResNet18"]


class ResNet18(ImageClassifier):
    """torchvision's ResNet18 in its CIFAR variant: a 3x3 stride-1 stem and no max-pool (about 11.17M parameters)."""

    def build_network(self) -> nn.Module:
        """Randomly initialised CIFAR ResNet18; no weights are downloaded."""
        resnet18 = require("torchvision.models", "models.ResNet18").resnet18
        net = resnet18(weights=None, num_classes=self.hparams.num_classes)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
        return net
