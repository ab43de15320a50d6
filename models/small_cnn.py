"""A small, fast CNN for 32x32x3 images: for demos and tests on a CPU."""

from __future__ import annotations

from typing import Optional

from torch import nn

from models.classifier import ImageClassifier

__all__ = ["SmallCNN"]


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(ImageClassifier):
    """Three 3x3 conv blocks (``width``, 2x, 4x channels), two max-pools, global average pool, linear head.

    About 24k parameters at the default ``width=16``, so a few hundred steps run in seconds on one CPU core.
    """

    def __init__(
        self,
        num_classes: int = 10,
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        cosine_schedule: bool = True,
        schedule_steps: Optional[int] = None,
        width: int = 16,
    ) -> None:
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        super().__init__(
            num_classes=num_classes,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            cosine_schedule=cosine_schedule,
            schedule_steps=schedule_steps,
        )

    def build_network(self) -> nn.Module:
        """The conv stack for ``hparams.width`` and ``hparams.num_classes``."""
        w = self.hparams.width
        return nn.Sequential(
            *_conv_block(3, w),
            nn.MaxPool2d(2),
            *_conv_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_block(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, self.hparams.num_classes),
        )
