"""Shared training logic for image classification: loss, metrics, the SGD + cosine recipe, the label-flip hook.

Nothing here knows about distributed training or BTARD, so the same module runs under Lightning's own
DDP, under ``BTARDStrategy`` or on a single process.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_btard.lightning_package import pl, rank_zero_warn

__all__ = ["ImageClassifier"]


class ImageClassifier(pl.LightningModule):
    """Cross-entropy image classifier trained with SGD (+ cosine schedule), as in the BTARD paper's ResNet18 setup.

    Subclasses provide the network by implementing :meth:`build_network`; it is stored as ``self.net``.
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
    ) -> None:
        super().__init__()
        if schedule_steps is not None and schedule_steps < 1:
            raise ValueError(f"schedule_steps must be >= 1 or None, got {schedule_steps}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.save_hyperparameters()
        self.net = self.build_network()
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def build_network(self) -> nn.Module:
        """The network mapping images ``[B, 3, H, W]`` to logits ``[B, num_classes]``; subclasses implement it."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement build_network(); use a subclass such as ResNet18 or SmallCNN"
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` for a batch of images."""
        return self.net(x)

    def _shared_step(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on ``batch = (x, y)``; logs ``train/loss`` and ``train/acc`` every step."""
        loss, logits, y = self._shared_step(batch)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Logs ``val/loss`` and ``val/acc`` averaged over the validation set."""
        loss, logits, y = self._shared_step(batch)
        self.val_acc(logits, y)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Logs ``test/loss`` and ``test/acc`` averaged over the test set."""
        loss, logits, y = self._shared_step(batch)
        self.test_acc(logits, y)
        self.log("test/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def configure_optimizers(self) -> Any:
        """SGD with (Nesterov) momentum and weight decay; with ``cosine_schedule``, cosine decay stepped per batch over
        ``schedule_steps`` steps (default: the run's length), so that a 25,000-step recipe stopped at step 5,100 keeps
        the learning rates of the full recipe (as the paper's released runs did)."""
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hp.lr,
            momentum=hp.momentum,
            nesterov=hp.nesterov,
            weight_decay=hp.weight_decay,
        )
        if not hp.cosine_schedule:
            return optimizer
        total_steps = hp.get("schedule_steps") or self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps) or total_steps < 1:
            rank_zero_warn(
                "cosine_schedule needs a finite training length (set max_steps or max_epochs); "
                "training with a constant learning rate instead."
            )
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def flip_labels(self, batch: Sequence[Tensor]) -> None:
        """Label-flipping attack hook: turn ``batch = (x, y)``'s labels into ``num_classes - 1 - y`` IN PLACE.

        In place because a callback cannot replace the batch object Lightning passes to ``training_step``.
        """
        if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not isinstance(batch[1], Tensor):
            raise TypeError(f"flip_labels expects a batch (x, y) with a label tensor y, got {type(batch).__name__}")
        y = batch[1]
        y.neg_().add_(self.hparams.num_classes - 1)
