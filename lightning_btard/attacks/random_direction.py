"""Constant random direction: every colluder sends the same seeded direction, scaled to its own norm.

From the released BTARD code (``ConstantDirection``): a direction fixed by a seed shared by all
attackers, scaled to 1000 times the attacker's honest gradient norm.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_btard.attacks.base import Attack, AttackContext, Byzantine, honest_norm, seeded_direction
from lightning_btard.ops.partition import trainable_params

__all__ = ["RandomDirection"]


class RandomDirection(Attack):
    """Send ``scale * ||g|| * u``, where ``u`` is a unit direction derived from ``seed`` alone.

    Every attacker (sharing ``seed``) sends the same direction at every attack step, with the norm
    of its own honest gradient ``g`` times ``scale``. The released code drew and scaled the
    direction per parameter tensor; here it is one direction over the whole flat gradient, so only
    its overall norm (not each tensor's) is tied to the honest gradient. The direction is drawn
    once and cached (one extra flat-gradient-sized tensor on each attacker).

    Args:
        scale: multiple of the attacker's honest gradient norm (the released code's default is 1000).
        per_tensor: the released code's attack, exactly: for each parameter tensor in the optimizer's order, a direction
            drawn from ``torch.manual_seed(seed)`` (one CPU generator, drawn tensor after tensor), scaled to ``scale``
            times that tensor's own gradient norm. (The released code drew on the gradient's device; a CUDA generator
            gives other numbers.)
    """

    def __init__(
        self,
        byzantine: Byzantine,
        scale: float = 1000.0,
        per_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(byzantine, **kwargs)
        self.scale = float(scale)
        self.per_tensor = bool(per_tensor)
        self._direction: Optional[Tensor] = None

    def attack_gradient(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        if self.per_tensor:
            return self._per_tensor(gradient, ctx)
        u = self._direction
        if u is None or u.numel() != gradient.numel() or u.dtype != gradient.dtype or u.device != gradient.device:
            u = self._direction = seeded_direction(gradient.numel(), self.seed, gradient)
        return u.view_as(gradient) * (honest_norm(gradient) * self.scale)

    def _per_tensor(self, gradient: Tensor, ctx: AttackContext) -> Tensor:
        sizes = self._tensor_sizes(ctx, gradient.numel())
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        out = torch.empty_like(gradient)
        for piece, grad, n in zip(out.split(sizes), gradient.split(sizes), sizes):
            z = torch.randn(n, generator=gen, dtype=torch.float32).to(device=gradient.device, dtype=gradient.dtype)
            piece.copy_(z * (grad.norm() * self.scale / z.norm()))
        return out

    @staticmethod
    def _tensor_sizes(ctx: AttackContext, numel: int) -> list[int]:
        """The sizes of the parameter tensors the flat gradient is made of (the optimizers' trainable parameters)."""
        strategy = getattr(ctx.trainer, "strategy", None)
        optimizers = getattr(strategy, "optimizers", None) or []
        sizes = [p.numel() for opt in optimizers for p in trainable_params(opt.param_groups)]
        if sum(sizes) != numel:
            raise RuntimeError(f"RandomDirection(per_tensor=True) needs the run's parameter tensors: found {sum(sizes)} "
                               f"elements in the optimizers' parameters for a gradient of {numel}")
        return sizes
