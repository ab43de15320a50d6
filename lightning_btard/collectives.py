"""Lightning's collectives over the BTARD peers: logging reductions, decisions, ``all_gather``, barriers and broadcasts.

They run over the current members (not torch.distributed's default group, which still holds banned and departed
peers), decide by median or majority where Lightning would sum (so one Byzantine peer cannot steer a logged metric or
a stop), and, on a backend that can regroup, fall back to this peer's own value after a failure until the next
aggregation regroups (:meth:`~lightning_btard.protocol.engine.PeerEngine.tolerant`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from lightning_btard.ops.robust_reduce import majority, robust_reduce

__all__ = ["PeerCollectives"]


class PeerCollectives:
    """Mixed into :class:`~lightning_btard.BTARDStrategy` (which provides ``engine``, ``transport``, ``root_device``,
    ``_catching_up`` and ``_hivemind``)."""

    engine: Any
    transport: Any
    root_device: torch.device
    _catching_up: bool
    _hivemind: Any

    def _tolerant(self, attempt: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        """A collective outside the aggregation (see :meth:`PeerEngine.tolerant`); none while catching up."""
        if self.engine is None or self._catching_up:
            return fallback()
        return self.engine.tolerant(attempt, fallback)

    def _gather(self, tensor: Tensor) -> Tensor:
        """``[n, *tensor.shape]``: every member's tensor of this shape (the same on every member), in member order."""
        assert self.transport is not None
        t, flat = self.transport, tensor.detach().reshape(-1).contiguous()
        return t.gather_parts(flat, [flat.numel()] * t.world_size).view(t.world_size, *tensor.shape)

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Union[str, Any]] = "mean") -> Any:
        """A logged tensor over peers (``self.log(sync_dist=True)``), robustly (``ops/robust_reduce.py``): mean is the
        median over peers, sum ``n`` times it, max/min an order statistic inside the honest peers' range. A sum or an
        extreme would be whatever one Byzantine peer chose."""
        if not isinstance(tensor, Tensor) or self.transport is None:
            return tensor
        op = str(reduce_op).lower().split(".")[-1] if reduce_op is not None else "mean"
        op = {"avg": "mean", "average": "mean"}.get(op, op)
        if op not in ("sum", "mean", "max", "min"):
            raise ValueError(f"BTARDStrategy.reduce does not support reduce_op={reduce_op!r}")
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        return self._tolerant(lambda: robust_reduce(self._gather(tensor), op).to(dtype), lambda: tensor)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """A decision (EarlyStopping, ModelCheckpoint) by the majority of peers: with "all", one Byzantine peer could
        veto every stop; with "any", force one."""
        if self.transport is None:
            return decision
        mine = torch.tensor([float(bool(decision))], device=self.root_device)
        return self._tolerant(lambda: majority(self._gather(mine).reshape(-1)), lambda: decision)

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        """Every member's ``tensor`` (same shape everywhere), stacked ``[n, ...]`` over the current members (not the
        default process group, which holds banned and departed peers). No gradient flows back (``sync_grads``)."""
        if self.transport is None:
            return tensor.unsqueeze(0)
        return self._tolerant(lambda: self._gather(tensor), lambda: tensor.unsqueeze(0))

    def _connected(self) -> bool:
        return self.transport is not None and (self._hivemind is not None or dist.is_initialized())

    @override
    def barrier(self, name: Optional[str] = None) -> None:
        if self._connected():
            self._tolerant(self.transport.barrier, lambda: None)  # type: ignore[union-attr]

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """On torch.distributed, ``src``'s ``obj``. On hivemind every peer is its own run (its own machine, directories and
        clock) and its own rank zero: Lightning's broadcasts (a checkpoint or log directory, the Timer's decision to
        stop) are its own decisions, and ``obj`` comes back unchanged."""
        if not self._connected() or self._hivemind is not None:
            return obj
        return self._tolerant(lambda: self.transport.broadcast_object(obj, src), lambda: obj)  # type: ignore[union-attr]
