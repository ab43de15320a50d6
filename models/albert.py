"""ALBERT pre-training (masked LM + sentence-order prediction) as a LightningModule, as in the BTARD paper.

``AlbertForPreTraining`` from transformers, configured by default as albert-large-v2 (built from the
values below, so nothing is downloaded) and trained from scratch. The optimisation is the released
code's: LAMB from ``torch-optimizer`` (the library the released code used) with lr 0.00176, betas
(0.9, 0.999), eps 1e-6, weight decay 0.01 except biases and LayerNorm weights, trust-ratio clamp 10000
and bias correction, and transformers' linear schedule (5000 warm-up steps, decay to zero at step
1,000,000). Gradient clipping (1.0 in the paper) and fp16 are the Trainer's ``gradient_clip_val`` and
``precision``. Nothing here knows about distributed training or BTARD.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from lightning_btard.extras import require
from lightning_btard.lightning_package import pl

__all__ = ["AlbertPretraining", "ALBERT_LARGE_V2", "NO_DECAY"]

ALBERT_LARGE_V2: dict[str, Any] = dict(
    vocab_size=30000,
    embedding_size=128,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    max_position_embeddings=512,
    hidden_act="gelu_new",
    dropout=0.0,
)
"""albert-large-v2's architecture (its ``config.json``), with dropout off as in the paper's runs."""

NO_DECAY = ("bias", "LayerNorm.weight")
"""Parameters whose name contains one of these get no weight decay (the released code's rule)."""


class AlbertPretraining(pl.LightningModule):
    """ALBERT trained from scratch on MLM + SOP; a batch is a dict with ``input_ids``, ``token_type_ids``,
    ``attention_mask``, ``labels`` (-100 where not masked) and ``sentence_order_label`` (1: swapped).

    Logs ``{train,val,test}/loss``, ``/mlm_loss``, ``/sop_loss``, ``/mlm_acc`` (over masked tokens) and ``/sop_acc``.
    """

    def __init__(
        self,
        vocab_size: int = 30000,
        embedding_size: int = 128,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size: int = 4096,
        max_position_embeddings: int = 512,
        hidden_act: str = "gelu_new",
        dropout: float = 0.0,
        lr: float = 0.00176,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        clamp_value: float = 10000.0,
        warmup_steps: int = 5000,
        total_steps: int = 1_000_000,
    ) -> None:
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps} and {total_steps}")
        self.save_hyperparameters()
        transformers = require("transformers", "models.AlbertPretraining")
        AlbertConfig, AlbertForPreTraining = transformers.AlbertConfig, transformers.AlbertForPreTraining

        config = AlbertConfig(
            vocab_size=vocab_size,
            embedding_size=embedding_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            hidden_act=hidden_act,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            classifier_dropout_prob=dropout,
            type_vocab_size=2,
            initializer_range=0.02,
            layer_norm_eps=1e-12,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        self.albert = AlbertForPreTraining(config)
        self.metrics = torch.nn.ModuleDict(
            {
                f"{stage}_{name}": metric
                for stage in ("train", "val", "test")
                for name, metric in (
                    ("mlm_acc", MulticlassAccuracy(num_classes=vocab_size, average="micro")),
                    ("sop_acc", BinaryAccuracy()),
                )
            }
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokens = getattr(datamodule, "vocab_size", None) if datamodule is not None else None
        if isinstance(tokens, int) and tokens > self.hparams.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokens} tokens but the model's vocab_size is {self.hparams.vocab_size}: set "
                f"model.vocab_size to at least {tokens} (albert-large-v2's tokenizer has 30000)"
            )

    def forward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """MLM logits ``[B, L, vocab]`` and SOP logits ``[B, 2]``."""
        out = self.albert(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            token_type_ids=batch.get("token_type_ids"),
        )
        return out.prediction_logits, out.sop_logits

    def _step(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        mlm_logits, sop_logits = self(batch)
        labels, order = batch["labels"], batch["sentence_order_label"]
        masked = labels != -100
        mlm_loss = F.cross_entropy(mlm_logits[masked].float(), labels[masked]) if masked.any() else mlm_logits.sum() * 0.0
        sop_loss = F.cross_entropy(sop_logits.float(), order)
        loss = mlm_loss + sop_loss
        mlm_acc, sop_acc = self.metrics[f"{stage}_mlm_acc"], self.metrics[f"{stage}_sop_acc"]
        if masked.any():
            mlm_acc(mlm_logits[masked].argmax(-1), labels[masked])
        sop_acc(sop_logits.argmax(-1), order)
        train = stage == "train"
        size = order.shape[0]
        opts = dict(on_step=train, on_epoch=not train, batch_size=size, sync_dist=not train)
        self.log(f"{stage}/loss", loss, prog_bar=True, **opts)
        self.log(f"{stage}/mlm_loss", mlm_loss, **opts)
        self.log(f"{stage}/sop_loss", sop_loss, **opts)
        self.log(f"{stage}/mlm_acc", mlm_acc, on_step=train, on_epoch=not train, batch_size=size)
        self.log(f"{stage}/sop_acc", sop_acc, on_step=train, on_epoch=not train, batch_size=size)
        return loss

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on every parameter except biases and LayerNorm weights (names containing :data:`NO_DECAY`)."""
        decay, no_decay = [], []
        for name, param in self.albert.named_parameters():
            if param.requires_grad:
                (no_decay if any(nd in name for nd in NO_DECAY) else decay).append(param)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> Any:
        """torch-optimizer's LAMB (clamp 10000, bias correction) with transformers' linear warm-up/decay, per step."""
        Lamb = require("torch_optimizer", "models.AlbertPretraining's LAMB optimizer").Lamb
        get_linear_schedule_with_warmup = require("transformers", "models.AlbertPretraining").get_linear_schedule_with_warmup

        hp = self.hparams
        optimizer = Lamb(
            self.parameter_groups(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, clamp_value=hp.clamp_value, debias=True
        )
        scheduler = get_linear_schedule_with_warmup(optimizer, hp.warmup_steps, hp.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def flip_labels(self, batch: Mapping[str, Tensor]) -> None:
        """Label-flipping attack hook (the released code's): masked-LM labels become ``(y + 1) mod vocab_size`` where
        a token is masked, sentence-order labels ``1 - y``; IN PLACE (a callback cannot replace the batch)."""
        if not isinstance(batch, Mapping) or "labels" not in batch or "sentence_order_label" not in batch:
            raise TypeError(f"flip_labels expects a batch dict with labels and sentence_order_label, got {type(batch).__name__}")
        labels, order = batch["labels"], batch["sentence_order_label"]
        masked = labels != -100
        labels[masked] = (labels[masked] + 1) % self.hparams.vocab_size
        order.neg_().add_(1)

    @classmethod
    def albert_large_v2(cls, **overrides: Any) -> "AlbertPretraining":
        """The paper's model (albert-large-v2's architecture, no dropout) with ``overrides``."""
        return cls(**{**ALBERT_LARGE_V2, **overrides})

