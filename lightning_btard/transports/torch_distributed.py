"""torch.distributed transport: gloo on CPU, NCCL on GPU, over a process group of the members."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_btard.ops.workspace import Workspace
from lightning_btard.transports.base import Transport

__all__ = ["TorchDistributedTransport"]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class TorchDistributedTransport(Transport):
    """Collectives over ``group`` (default: the whole world), whose member order is the global rank order."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, ranks: Optional[Sequence[int]] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchDistributedTransport needs an initialised torch.distributed process group")
        self.group = group
        self.ranks = list(ranks) if ranks is not None else list(range(dist.get_world_size()))
        self._rank = self.ranks.index(dist.get_rank())
        self._buffers = Workspace()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def exchange(self, sends: Sequence[Sequence[Tensor]], recvs: Sequence[Sequence[Tensor]]) -> list[Optional[list[Any]]]:
        # Point-to-point receives have a fixed size: a message of another size fails in gloo itself.
        self._exchange(sends, recvs)
        for dst, src in zip(recvs[self.rank], sends[self.rank]):
            dst.copy_(src)
        return [None] * self.world_size

    def _exchange(self, sends: Sequence[Sequence[Tensor]], recvs: Sequence[Sequence[Tensor]]) -> None:
        """Send the tensors ``sends[j]`` to member ``j`` and receive ``recvs[i]`` from member ``i`` (own slot
        excluded), all posted at once.

        Point-to-point messages posted in shifted order (member ``rank+k`` and ``rank-k`` in round ``k``):
        on gloo this is faster than its all-to-all and all-gather, and together the two phases of a
        round move the same bytes as a ring all-reduce.
        """
        n, me = self.world_size, self.rank
        nccl = dist.get_backend(self.group) == "nccl"
        ops, works = [], []
        for k in range(1, n):
            to, frm = (me + k) % n, (me - k) % n
            for tensor in sends[to]:
                if nccl:
                    ops.append(dist.P2POp(dist.isend, tensor, self.ranks[to], self.group))
                else:
                    works.append(dist.isend(tensor.contiguous(), self.ranks[to], group=self.group))
            for tensor in recvs[frm]:
                if nccl:
                    ops.append(dist.P2POp(dist.irecv, tensor, self.ranks[frm], self.group))
                else:
                    works.append(dist.irecv(tensor, self.ranks[frm], group=self.group))
        if ops:
            works = dist.batch_isend_irecv(ops)
        for work in works:
            work.wait()

    def scatter_parts(self, flat: Tensor, sizes: Sequence[int]) -> Tensor:
        n, me = self.world_size, self.rank
        out = self._buffers.get("scatter", (n, sizes[me]), flat.dtype, flat.device)
        parts = torch.split(flat, list(sizes))
        self._exchange([[p] for p in parts], [[row] for row in out.unbind(0)])
        out[me].copy_(parts[me])
        return out

    def gather_parts(self, part: Tensor, sizes: Sequence[int], out: Optional[Tensor] = None) -> Tensor:
        out = torch.empty(sum(sizes), dtype=part.dtype, device=part.device) if out is None else out
        slots = torch.split(out, list(sizes))
        self._exchange([[part]] * self.world_size, [[slot] for slot in slots])
        slots[self.rank].copy_(part)
        return out

    def gather_parts_with_extra(
        self, part: Tensor, extra: Tensor, sizes: Sequence[int], out: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        out = torch.empty(sum(sizes), dtype=part.dtype, device=part.device) if out is None else out
        slots = torch.split(out, list(sizes))
        extras = torch.empty((self.world_size, *extra.shape), dtype=extra.dtype, device=extra.device)
        self._exchange([[part, extra]] * self.world_size, [[slot, e] for slot, e in zip(slots, extras.unbind(0))])
        slots[self.rank].copy_(part)
        extras[self.rank].copy_(extra)
        return out, extras

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=_OPS[op], group=self.group)
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.group)
        return box[0]

    def broadcast_tensor_(self, tensor: Tensor, src: int = 0) -> Tensor:
        dist.broadcast(tensor, src=self.ranks[src], group=self.group)
        return tensor

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def subgroup(self, members: Sequence[int]) -> Optional[Transport]:
        global_ranks = [self.ranks[m] for m in sorted(members)]
        # every member of this transport calls new_group: torch salts group names with a per-process counter that
        # non-members of a use_local_synchronization group do not advance, so such groups would desynchronise it
        group = dist.new_group(ranks=global_ranks, backend=dist.get_backend(self.group), use_local_synchronization=False)
        if dist.get_rank() not in global_ranks:
            return None
        return TorchDistributedTransport(group=group, ranks=global_ranks)
