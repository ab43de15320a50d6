"""Label flipping: the attacker trains on wrong labels (``num_classes - 1 - y``; CIFAR-10's ``9 - y``).

From the released BTARD code (``LabelFlipper``); the gradient itself is sent unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_btard.attacks.base import Attack
from lightning_btard.lightning_package import pl

__all__ = ["LabelFlipping"]


class LabelFlipping(Attack):
    """Flip the labels of the attacker's batches in place at its attack steps.

    The rule is, in order: the LightningModule's ``flip_labels(batch)``, else the datamodule's
    ``flip_labels(batch)``, else, for an ``(inputs, labels)`` batch with integer labels,
    ``num_classes - 1 - y`` with ``num_classes`` from ``pl_module.hparams`` or ``pl_module``.
    ``flip_labels`` must modify the batch in place (a callback cannot replace it) and return None.
    Every micro-batch of an attack step is flipped; the attack is recorded once per step.
    """


    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if not self.is_attacking(trainer.global_step, trainer.global_rank):
            return
        for owner in (pl_module, getattr(trainer, "datamodule", None)):
            flip = getattr(owner, "flip_labels", None)
            if callable(flip):
                if flip(batch) is not None:
                    raise TypeError(
                        f"{type(owner).__name__}.flip_labels must flip the batch in place and return None "
                        f"(a callback cannot replace the batch)"
                    )
                return
        self._flip_default(pl_module, batch)

    @staticmethod
    def _flip_default(pl_module: "pl.LightningModule", batch: Any) -> None:
        hint = f"define flip_labels(batch) on {type(pl_module).__name__} (or its datamodule) to flip labels in place"
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor)):
            raise TypeError(f"LabelFlipping's default rule needs an (inputs, labels) batch, got {type(batch).__name__}: {hint}")
        labels = batch[1]
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"LabelFlipping's default rule needs integer labels, got {labels.dtype}: {hint}")
        num_classes = getattr(getattr(pl_module, "hparams", None), "num_classes", None)
        if num_classes is None:
            num_classes = getattr(pl_module, "num_classes", None)
        if num_classes is None:
            raise AttributeError(f"LabelFlipping's default rule needs num_classes in {type(pl_module).__name__}.hparams: {hint}")
        labels.neg_().add_(int(num_classes) - 1)
