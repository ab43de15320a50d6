"""AlbertPretraining: the albert-large-v2 architecture, the losses, LAMB and its schedule, the label flip."""

from __future__ import annotations

import math

import pytest
import torch

from models import AlbertPretraining
from models.albert import ALBERT_LARGE_V2

TINY = dict(
    vocab_size=50, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=32,
)


def tiny(**kw) -> AlbertPretraining:
    torch.manual_seed(0)
    return AlbertPretraining(**{**TINY, **kw})


def masked_batch(model: AlbertPretraining, batch_size: int = 4, length: int = 12, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.hparams.vocab_size
    ids = torch.randint(5, vocab, (batch_size, length), generator=gen)
    labels = torch.full_like(ids, -100)
    where = torch.rand(ids.shape, generator=gen) < 0.3
    where[:, 0] = True
    labels[where] = ids[where]
    ids[where] = 4
    types = torch.zeros_like(ids)
    types[:, length // 2 :] = 1
    return {
        "input_ids": ids, "token_type_ids": types, "attention_mask": torch.ones_like(ids), "labels": labels,
        "sentence_order_label": torch.randint(0, 2, (batch_size,), generator=gen),
    }


def test_default_architecture_is_albert_large_v2() -> None:
    model = AlbertPretraining()
    c = model.albert.config
    got = {k: getattr(c, k) for k in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                                        "num_attention_heads", "intermediate_size", "max_position_embeddings", "hidden_act")}
    assert got == {k: v for k, v in ALBERT_LARGE_V2.items() if k != "dropout"}
    assert got["hidden_act"] == "gelu_new" and c.hidden_dropout_prob == c.attention_probs_dropout_prob == 0.0
    assert c.num_hidden_groups == 1 and c.type_vocab_size == 2
    # Counted by hand: embeddings 30000*128 + 512*128 + 2*128 + LayerNorm 256, mapping 128*1024 + 1024, one shared
    # layer (4 attention projections, 2 LayerNorms, FFN 1024->4096->1024), pooler 1024*1024 + 1024: 17,683,968 (the
    # published "18M"); MLM head 1024*128 + 128 + 256 + bias 30000 (decoder tied to the embeddings); SOP 1024*2 + 2.
    layer = 4 * (1024 * 1024 + 1024) + 2 * 2048 + (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
    encoder = 30000 * 128 + 512 * 128 + 2 * 128 + 256 + 128 * 1024 + 1024 + layer + 1024 * 1024 + 1024
    assert encoder == 17_683_968
    assert sum(p.numel() for p in model.parameters()) == encoder + (1024 * 128 + 128 + 256 + 30000) + (1024 * 2 + 2)
    assert model.hparams.lr == 0.00176 and tuple(model.hparams.betas) == (0.9, 0.999) and model.hparams.eps == 1e-6
    assert model.hparams.weight_decay == 0.01 and model.hparams.clamp_value == 10000.0
    assert model.hparams.warmup_steps == 5000 and model.hparams.total_steps == 1_000_000


def test_losses_match_transformers_own_pretraining_loss() -> None:
    model = tiny()
    batch = masked_batch(model)
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore[method-assign]
    loss = model.training_step(batch, 0)
    reference = model.albert(
        input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"], attention_mask=batch["attention_mask"],
        labels=batch["labels"], sentence_order_label=batch["sentence_order_label"],
    ).loss
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(logged["train/mlm_loss"] + logged["train/sop_loss"], loss)
    assert {"train/loss", "train/mlm_loss", "train/sop_loss", "train/mlm_acc", "train/sop_acc"} <= set(logged)


def test_weight_decay_skips_biases_and_layer_norm_weights() -> None:
    model = tiny()
    decay, no_decay = model.parameter_groups()
    names = {id(p): n for n, p in model.albert.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(not n.endswith("bias") and "LayerNorm.weight" not in n for n in (names[id(p)] for p in decay["params"]))
    assert all(n.endswith("bias") or n.endswith("LayerNorm.weight") for n in (names[id(p)] for p in no_decay["params"]))
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.albert.parameters()))
    assert any("LayerNorm.weight" in names[id(p)] for p in no_decay["params"])


def test_lamb_step_matches_the_formula_of_the_released_code() -> None:
    """torch-optimizer's Lamb(debias=True, clamp_value): the update, written out independently."""
    model = tiny(warmup_steps=0, lr=0.01, clamp_value=0.5)
    optimizer = model.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in model.albert.named_parameters()}
    model.log = lambda *a, **k: None  # type: ignore[method-assign]
    model.training_step(masked_batch(model), 0).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.albert.named_parameters()}
    optimizer.step()
    b1, b2, eps, lr = 0.9, 0.999, 1e-6, 0.01
    step_size = lr * math.sqrt(1 - b2) / (1 - b1)
    for name, p in model.albert.named_parameters():
        g, w = grads[name].double(), before[name].double()
        wd = 0.0 if (name.endswith("bias") or "LayerNorm.weight" in name) else 0.01
        m, v = (1 - b1) * g, (1 - b2) * g * g
        update = m / (v.sqrt() + eps) + wd * w
        w_norm, u_norm = min(w.norm().item(), 0.5), update.norm().item()
        trust = 1.0 if w_norm == 0 or u_norm == 0 else w_norm / u_norm
        torch.testing.assert_close(p.detach().double(), w - step_size * trust * update, rtol=1e-5, atol=1e-7, msg=name)


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    model = tiny(lr=0.002, warmup_steps=100, total_steps=1100)
    config = model.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(1101):
        lrs.append(scheduler.get_last_lr()[0])
        config["optimizer"].step()
        scheduler.step()
    expected = {0: 0.0, 50: 0.001, 100: 0.002, 600: 0.001, 1100: 0.0}
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, abs=1e-12), step


def test_flip_labels_flips_masked_tokens_and_sentence_order() -> None:
    model = tiny()
    batch = masked_batch(model)
    batch["labels"][0, 0] = model.hparams.vocab_size - 1
    labels, order = batch["labels"].clone(), batch["sentence_order_label"].clone()
    ids = batch["input_ids"].clone()
    model.flip_labels(batch)
    masked = labels != -100
    assert torch.equal(batch["labels"][masked], (labels[masked] + 1) % model.hparams.vocab_size)
    assert batch["labels"][0, 0] == 0
    assert (batch["labels"][~masked] == -100).all()
    assert torch.equal(batch["sentence_order_label"], 1 - order)
    assert torch.equal(batch["input_ids"], ids)
    with pytest.raises(TypeError, match="labels and sentence_order_label"):
        model.flip_labels((ids, labels))


def test_label_flipping_callback_uses_the_models_rule() -> None:
    from types import SimpleNamespace

    from lightning_btard.attacks import LabelFlipping

    model = tiny()
    batch = masked_batch(model)
    order = batch["sentence_order_label"].clone()
    attack = LabelFlipping(byzantine=[1], attack_start=3)
    trainer = SimpleNamespace(global_step=2, global_rank=1, datamodule=None)
    attack.on_train_batch_start(trainer, model, batch, 0)  # before attack_start: untouched
    assert torch.equal(batch["sentence_order_label"], order)
    trainer.global_step = 3
    attack.on_train_batch_start(trainer, model, batch, 0)
    assert torch.equal(batch["sentence_order_label"], 1 - order)
    trainer.global_rank = 0  # honest peer: untouched
    attack.on_train_batch_start(trainer, model, batch, 0)
    assert torch.equal(batch["sentence_order_label"], 1 - order)


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        AlbertPretraining(**{**TINY, "hidden_size": 15})
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        AlbertPretraining(**TINY, warmup_steps=10, total_steps=5)
