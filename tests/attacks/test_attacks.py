"""Behaviour of the attack callbacks: each called on every peer of a small world, as the strategy calls them."""

from __future__ import annotations

import io
import logging
import math
import types
from typing import Any, Callable

import pytest
import torch
from peers import run_peers
from torch import Tensor

from lightning_btard.attacks import (
    ALittleIsEnough,
    Attack,
    AttackContext,
    DelayedGradient,
    InnerProductManipulation,
    LabelFlipping,
    RandomDirection,
    SignFlipping,
)
from lightning_btard.attacks.a_little_is_enough import alie_z_max
from lightning_btard.lightning_package import pl
from lightning_btard.transports import Transport

N, BYZ, D = 5, [1, 3], 37
START, EVERY, STEPS = 3, 2, range(12)
SCHEDULED = [3, 5, 7, 9, 11]


def grad(rank: int, step: int, d: int = D) -> Tensor:
    """Peer ``rank``'s honest flat gradient at ``step`` (float32, deterministic)."""
    gen = torch.Generator().manual_seed(1000 * step + rank + 1)
    return torch.randn(d, generator=gen)


def run_world(make: Callable[[], Attack], steps: Any = STEPS, n: int = N, d: int = D) -> list[dict[str, Any]]:
    """Every peer builds its own attack and calls it once per step, with the strategy's collusion set-up."""

    def peer(t: Transport) -> dict[str, Any]:
        attack = make()
        if attack.colluding:
            attack.collusion = t.subgroup(attack.byzantine)
        grads, outs = {}, {}
        for step in steps:
            g = grad(t.rank, step, d)
            grads[step] = g
            outs[step] = attack.on_before_aggregate(g, AttackContext(step=step, rank=t.rank, world_size=n))
        return {"attack": attack, "grads": grads, "outs": outs}

    return run_peers(n, peer, timeout=20.0)


def check(res: list[dict[str, Any]], byzantine: list[int], fired: list[int], expected: Callable[[int, int], Tensor]) -> None:
    """Honest peers and off-schedule steps are untouched; Byzantine peers send ``expected(rank, step)`` exactly when firing."""
    for rank, r in enumerate(res):
        for step, out in r["outs"].items():
            if rank in byzantine and step in fired:
                torch.testing.assert_close(out, expected(rank, step).to(torch.float32), rtol=1e-5, atol=1e-6)
            else:
                assert out is r["grads"][step], (rank, step)
        assert r["attack"].fired_steps == (fired if rank in byzantine else [])
        assert not r["attack"].caught


def test_sign_flipping() -> None:
    res = run_world(lambda: SignFlipping(BYZ, attack_start=START, attack_every=EVERY))
    check(res, BYZ, SCHEDULED, lambda rank, step: -1000.0 * grad(rank, step).double())
    res = run_world(lambda: SignFlipping(BYZ, scale=-3.5), steps=range(3))
    check(res, BYZ, [0, 1, 2], lambda rank, step: -3.5 * grad(rank, step).double())


def test_random_direction_same_direction_and_scaled_norm() -> None:
    seed = 7
    res = run_world(lambda: RandomDirection(BYZ, attack_start=START, attack_every=EVERY, seed=seed, scale=1000.0))
    z = torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = z / z.norm()
    check(res, BYZ, SCHEDULED, lambda rank, step: u * 1000.0 * grad(rank, step).double().norm())
    for rank in BYZ:
        for step in SCHEDULED:
            out = res[rank]["outs"][step].double()
            assert out.norm().item() == pytest.approx(1000.0 * grad(rank, step).double().norm().item(), rel=1e-5)
            torch.testing.assert_close(out / out.norm(), u)


def test_inner_product_manipulation() -> None:
    res = run_world(lambda: InnerProductManipulation(BYZ, attack_start=START, attack_every=EVERY, epsilon=0.1))
    check(res, BYZ, SCHEDULED, lambda rank, step: -0.1 * (grad(1, step).double() + grad(3, step).double()) / 2)


def test_alie_z_max_by_hand() -> None:
    # n=16, f=7: s = floor(16/2 + 1) - 7 = 2, z_max = Phi^{-1}((16 - 2) / 16) = Phi^{-1}(0.875)
    assert alie_z_max(16, 7) == pytest.approx(1.1503493803760079, rel=1e-12)
    # n=5, f=2: s = floor(3.5) - 2 = 1, z_max = Phi^{-1}(4/5)
    assert alie_z_max(5, 2) == pytest.approx(0.8416212335729143, rel=1e-12)
    with pytest.raises(ValueError, match="pass z explicitly"):
        alie_z_max(5, 4)


def _alie_expected(byzantine: list[int], z: float) -> Callable[[int, int], Tensor]:
    def expected(rank: int, step: int) -> Tensor:
        g = torch.stack([grad(r, step).double() for r in byzantine])
        mu = g.sum(0) / len(byzantine)
        sigma = ((g - mu) ** 2).sum(0).div(len(byzantine) - 1).sqrt()
        return mu - z * sigma

    return expected


def test_a_little_is_enough_default_z() -> None:
    res = run_world(lambda: ALittleIsEnough(BYZ, attack_start=START, attack_every=EVERY))
    check(res, BYZ, SCHEDULED, _alie_expected(BYZ, 0.8416212335729143))


def test_a_little_is_enough_explicit_z() -> None:
    res = run_world(lambda: ALittleIsEnough(BYZ, z=1.5), steps=range(2))
    check(res, BYZ, [0, 1], _alie_expected(BYZ, 1.5))


def test_a_little_is_enough_16_peers_7_byzantine() -> None:
    byz = [0, 2, 4, 6, 8, 10, 12]
    res = run_world(lambda: ALittleIsEnough(byz), steps=range(1), n=16)
    check(res, byz, [0], _alie_expected(byz, 1.1503493803760079))


def test_delayed_gradient_sends_gradient_of_t_minus_delay() -> None:
    # attack steps 5, 7, 9 (window [5, 5 + 3 * 2) = [5, 11)); saved steps 1, 3, 5
    res = run_world(lambda: DelayedGradient(BYZ, attack_start=5, attack_every=2, delay=4, attack_length=3), steps=range(16))
    check(res, BYZ, [5, 7, 9], lambda rank, step: grad(rank, step - 4).double())
    for rank in BYZ:
        for step in (5, 7, 9):
            assert torch.equal(res[rank]["outs"][step], grad(rank, step - 4))
        assert res[rank]["attack"]._stored == {}
    for rank in set(range(N)) - set(BYZ):
        assert res[rank]["attack"]._stored == {}


def test_delayed_gradient_before_recorded_falls_back_to_honest(caplog: pytest.LogCaptureFixture) -> None:
    # attack steps 2..5; steps 2 and 3 would need the gradients of steps -2 and -1, which never existed
    with caplog.at_level(logging.WARNING, logger="lightning_btard.attacks"):
        res = run_world(lambda: DelayedGradient([1], attack_start=2, delay=4, attack_length=4), steps=range(8), n=2)
    check(res, [1], [4, 5], lambda rank, step: grad(rank, step - 4).double())
    assert sum("no gradient from step" in m for m in caplog.messages) == 1


def test_delayed_gradient_resumed_past_save_point() -> None:
    attack = DelayedGradient([0], attack_start=2, delay=2, attack_length=7)
    outs = {s: attack.on_before_aggregate(grad(0, s), AttackContext(step=s, rank=0, world_size=3)) for s in range(5, 9)}
    assert outs[5] is not None and torch.equal(outs[5], grad(0, 5)) and torch.equal(outs[6], grad(0, 6))
    assert torch.equal(outs[7], grad(0, 5)) and torch.equal(outs[8], grad(0, 6))
    assert attack.fired_steps == [7, 8]
    assert attack._stored == {}


class TinyClassifier(pl.LightningModule):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, num_classes)


class FlippingModule(pl.LightningModule):
    def __init__(self, vocab: int = 7) -> None:
        super().__init__()
        self.vocab = vocab

    def flip_labels(self, batch: dict[str, Tensor]) -> None:
        batch["labels"].add_(1).remainder_(self.vocab)


def trainer(step: int, rank: int, datamodule: Any = None) -> Any:
    return types.SimpleNamespace(global_step=step, global_rank=rank, datamodule=datamodule)


def test_label_flipping_default_rule_in_place() -> None:
    attack = LabelFlipping(BYZ, attack_start=START, attack_every=EVERY)
    module = TinyClassifier(num_classes=10)
    for step in STEPS:
        for rank in range(N):
            y = torch.arange(10).repeat(2)
            batch = (torch.zeros(20, 4), y)
            attack.on_train_batch_start(trainer(step, rank), module, batch, 0)
            assert batch[1] is y
            if rank in BYZ and step in SCHEDULED:
                assert torch.equal(y, 9 - torch.arange(10).repeat(2))
            else:
                assert torch.equal(y, torch.arange(10).repeat(2))


def test_label_flipping_records_once_per_step_and_keeps_gradient() -> None:
    res = run_world(lambda: LabelFlipping(BYZ, attack_start=START, attack_every=EVERY))
    check(res, BYZ, SCHEDULED, lambda rank, step: grad(rank, step).double())


def test_label_flipping_num_classes_attribute() -> None:
    plain = pl.LightningModule()
    plain.num_classes = 3
    y = torch.tensor([0, 1, 2])
    LabelFlipping([0]).on_train_batch_start(trainer(0, 0), plain, [torch.zeros(3), y], 0)
    assert y.tolist() == [2, 1, 0]


def test_label_flipping_uses_module_flip_labels() -> None:
    attack = LabelFlipping([1])
    batch = {"input_ids": torch.zeros(3, dtype=torch.long), "labels": torch.tensor([0, 3, 6])}
    attack.on_train_batch_start(trainer(0, 1), FlippingModule(vocab=7), batch, 0)
    assert batch["labels"].tolist() == [1, 4, 0]
    batch = {"labels": torch.tensor([0, 3, 6])}
    attack.on_train_batch_start(trainer(0, 0), FlippingModule(vocab=7), batch, 0)
    assert batch["labels"].tolist() == [0, 3, 6]


def test_label_flipping_uses_datamodule_flip_labels() -> None:
    class SOPDataModule:
        def flip_labels(self, batch: tuple[Tensor, Tensor]) -> None:
            batch[1].copy_(1 - batch[1])

    dm = SOPDataModule()
    y = torch.tensor([0, 1, 1])
    LabelFlipping([0]).on_train_batch_start(trainer(0, 0, dm), pl.LightningModule(), (torch.zeros(3), y), 0)
    assert y.tolist() == [1, 0, 0]


def test_label_flipping_clear_errors() -> None:
    attack = LabelFlipping([0])
    with pytest.raises(AttributeError, match="flip_labels"):
        attack.on_train_batch_start(trainer(0, 0), pl.LightningModule(), (torch.zeros(2), torch.tensor([0, 1])), 0)
    with pytest.raises(TypeError, match="integer labels"):
        attack.on_train_batch_start(trainer(0, 0), TinyClassifier(), (torch.zeros(2), torch.tensor([0.0, 1.0])), 0)
    with pytest.raises(TypeError, match="flip_labels"):
        attack.on_train_batch_start(trainer(0, 0), TinyClassifier(), {"labels": torch.tensor([0])}, 0)
    dm = types.SimpleNamespace(flip_labels=lambda b: (b[0], 9 - b[1]))
    with pytest.raises(TypeError, match="in place"):
        attack.on_train_batch_start(trainer(0, 0, dm), pl.LightningModule(), (torch.zeros(2), torch.tensor([0, 1])), 0)


def test_ban_prob_one_catches_after_first_attack() -> None:
    res = run_world(lambda: SignFlipping(BYZ, attack_start=START, attack_every=EVERY, ban_prob=1.0))
    for rank, r in enumerate(res):
        for step, out in r["outs"].items():
            if rank in BYZ and step == START:
                torch.testing.assert_close(out, -1000.0 * grad(rank, step))
            else:
                assert out is r["grads"][step]
        assert r["attack"].fired_steps == ([START] if rank in BYZ else [])
        assert r["attack"].caught == (rank in BYZ)


def test_ban_prob_one_colluding_attackers_keep_exchanging() -> None:
    res = run_world(lambda: InnerProductManipulation(BYZ, attack_start=START, attack_every=EVERY, ban_prob=1.0))
    for rank, r in enumerate(res):
        for step, out in r["outs"].items():
            if rank in BYZ and step == START:
                torch.testing.assert_close(out, -0.1 * (grad(1, step) + grad(3, step)) / 2)
            else:
                assert out is r["grads"][step]
        assert r["attack"].caught == (rank in BYZ)


def test_ban_prob_zero_never_catches() -> None:
    res = run_world(lambda: SignFlipping(BYZ, ban_prob=0.0), steps=range(30))
    check(res, BYZ, list(range(30)), lambda rank, step: -1000.0 * grad(rank, step).double())


def test_state_dict_round_trip() -> None:
    a = SignFlipping([0], ban_prob=0.1, seed=0)
    for step in range(6):
        a.on_before_aggregate(grad(0, step), AttackContext(step=step, rank=0, world_size=2))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = SignFlipping([0], ban_prob=0.1, seed=0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert (b.caught, b.fired_steps) == (a.caught, a.fired_steps) == (False, list(range(6)))
    for step in range(6, 60):
        ctx = AttackContext(step=step, rank=0, world_size=2)
        assert torch.equal(a.on_before_aggregate(grad(0, step), ctx), b.on_before_aggregate(grad(0, step), ctx))
    assert (b.caught, b.fired_steps) == (a.caught, a.fired_steps)
    assert a.caught and 6 < len(a.fired_steps) < 60  # the reloaded coin continues where it stopped


def test_caught_state_survives_reload() -> None:
    a = SignFlipping([0], ban_prob=1.0)
    a.on_before_aggregate(grad(0, 0), AttackContext(step=0, rank=0, world_size=2))
    b = SignFlipping([0], ban_prob=1.0)
    b.load_state_dict(a.state_dict())
    assert b.caught and b.fired_steps == [0]
    g = grad(0, 1)
    assert b.on_before_aggregate(g, AttackContext(step=1, rank=0, world_size=2)) is g


@pytest.mark.parametrize(
    ("cls", "extra"),
    [
        (SignFlipping, {"scale": -10.0}),
        (RandomDirection, {"scale": 10.0}),
        (LabelFlipping, {}),
        (DelayedGradient, {"delay": 10, "attack_length": 5}),
        (InnerProductManipulation, {"epsilon": 0.5}),
        (ALittleIsEnough, {"z": None}),
        (ALittleIsEnough, {"z": 1.0}),
    ],
)
def test_constructible_from_config(cls: type[Attack], extra: dict[str, Any]) -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "attack")
    cfg = parser.parse_object({"attack": {"byzantine": [1, 3], "attack_start": 2, "attack_every": 3, "ban_prob": 0.5, **extra}})
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    attack = instantiate(cfg).attack
    assert isinstance(attack, cls)
    assert (attack.byzantine, attack.attack_start, attack.attack_every, attack.ban_prob) == ([1, 3], 2, 3, 0.5)
    for key, value in extra.items():
        assert getattr(attack, key) == value


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="delay"):
        DelayedGradient([0], delay=-1)
    with pytest.raises(ValueError, match="attack_every"):
        SignFlipping([0], attack_every=0)
    assert not math.isnan(alie_z_max(2, 1))
