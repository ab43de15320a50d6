"""The fidelity switches that reproduce the released BTARD code where we deliberately differ, each against the
released code's own formula, written out here independently."""

from __future__ import annotations

import random
import types

import pytest
import torch

from lightning_btard.attacks import DelayedGradient, RandomDirection, SignFlipping
from lightning_btard.attacks.base import AttackContext, draw_byzantine


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_attackers_drawn_by_seed_as_released(seed) -> None:
    # the released notebook: BYZANTINE_IDS = random.Random(GLOBAL_SEED).sample(range(1, NUM_WORKERS), NUM_BYZANTINES)
    released = random.Random(seed).sample(range(1, 16), 7)
    assert draw_byzantine(7, 16, seed) == sorted(released)
    attack = SignFlipping(byzantine={"sample": 7, "peers": 16, "seed": seed})
    assert attack.byzantine == sorted(released) and 0 not in attack.byzantine


def test_a_draw_needs_its_three_keys() -> None:
    with pytest.raises(ValueError, match="exactly the keys"):
        SignFlipping(byzantine={"sample": 7, "peers": 16})
    with pytest.raises(ValueError, match="cannot draw"):
        draw_byzantine(16, 16, 0)


def test_released_schedule_fires_after_start_on_multiples_of_the_period() -> None:
    # released: num_steps > attack_start and num_steps % attack_every == 0
    released = SignFlipping(byzantine=[1], attack_start=1000, attack_every=10, schedule="released")
    ours = SignFlipping(byzantine=[1], attack_start=1005, attack_every=10)
    steps = range(990, 1060)
    assert [t for t in steps if released.scheduled(t)] == [t for t in steps if t > 1000 and t % 10 == 0]
    assert [t for t in steps if ours.scheduled(t)] == list(range(1005, 1060, 10))
    # the delayed gradient's window, released: attack_start < t < attack_end
    delayed = DelayedGradient(byzantine=[1], delay=3, attack_start=10, attack_length=5, schedule="released")
    assert [t for t in range(30) if delayed.scheduled(t)] == [t for t in range(30) if 10 < t < 15]


def test_released_ban_prob_is_the_released_runs_value() -> None:
    attack = SignFlipping(byzantine={"sample": 7, "peers": 16, "seed": 0}, ban_prob="released", attack_start=5)
    g = torch.ones(4)
    attack.on_before_aggregate(g, AttackContext(step=0, rank=attack.byzantine[0], world_size=16))
    # the released notebook: ban_prob = 1. / NUM_WORKERS * ((NUM_WORKERS - NUM_BYZANTINES) / NUM_WORKERS)
    assert attack.ban_prob == pytest.approx(1.0 / 16 * ((16 - 7) / 16))
    with pytest.raises(ValueError, match="ban_prob"):
        SignFlipping(byzantine=[1], ban_prob=1.5)


def test_per_tensor_random_direction_is_the_released_constant_direction() -> None:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    model(torch.randn(4, 5)).pow(2).sum().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(optimizers=[optimizer]))
    attack = RandomDirection(byzantine=[2], per_tensor=True, seed=11)
    sent = attack.on_before_aggregate(flat.clone(), AttackContext(step=0, rank=2, world_size=4, trainer=trainer))  # type: ignore[arg-type]
    # the released ConstantDirection.compute_grads, on a copy of the gradients
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.random.fork_rng():
        torch.manual_seed(11)
        for g in grads:
            rand_buf = torch.randn_like(g)
            g[...] = rand_buf * (1 / rand_buf.norm() * g.norm() * 1000)
    assert torch.allclose(sent, torch.cat([g.reshape(-1) for g in grads]), rtol=1e-5, atol=1e-6)
    # each tensor keeps 1000 times its own norm (the whole-vector direction only ties the overall norm)
    for piece, g in zip(sent.split([p.numel() for p in model.parameters()]), model.parameters()):
        assert float(piece.norm()) == pytest.approx(1000 * float(g.grad.norm()), rel=1e-5)


def test_per_tensor_needs_the_runs_parameters() -> None:
    attack = RandomDirection(byzantine=[0], per_tensor=True)
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(optimizers=[]))
    with pytest.raises(RuntimeError, match="parameter tensors"):
        attack.on_before_aggregate(torch.ones(3), AttackContext(step=0, rank=0, world_size=2, trainer=trainer))  # type: ignore[arg-type]
