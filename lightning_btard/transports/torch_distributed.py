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

    def _exchange(self, sends: Sequence[Tensor], recvs: Sequence[Tensor]) -> None:
        """Send ``sends[j]`` to member ``j`` and receive ``recvs[i]`` from member ``i`` (own slot excluded), all at once.

        Point-to-point messages posted in shifted order (member ``rank+k`` and ``rank-k`` in round ``k``):
        on gloo this is faster than its all-to-all, and together the two phases of a round move the
        same bytes as a ring all-reduce.
        """
        n, me = self.world_size, self.rank
        if dist.get_backend(self.group) == "nccl":
            ops = []
            for k in range(1, n):
                to, frm = (me + k) % n, (me - k) % n
                ops.append(dist.P2POp(dist.isend, sends[to], self.ranks[to], self.group))
                ops.append(dist.P2POp(dist.irecv, recvs[frm], self.ranks[frm], self.group))
            works = dist.batch_isend_irecv(ops) if ops else []
        else:
            works = []
            for k in range(1, n):
                to, frm = (me + k) % n, (me - k) % n
                works.append(dist.isend(sends[to].contiguous(), self.ranks[to], group=self.group))
                works.append(dist.irecv(recvs[frm], self.ranks[frm], group=self.group))
        for work in works:
            work.wait()

    def scatter_parts(self, flat: Tensor, sizes: Sequence[int]) -> Tensor:
        n, me = self.world_size, self.rank
        out = self._buffers.get("scatter", (n, sizes[me]), flat.dtype, flat.device)
        parts = torch.split(flat, list(sizes))
        self._exchange(parts, list(out.unbind(0)))
        out[me].copy_(parts[me])
        return out

    def gather_parts(self, part: Tensor, sizes: Sequence[int], out: Optional[Tensor] = None) -> Tensor:
        out = torch.empty(sum(sizes), dtype=part.dtype, device=part.device) if out is None else out
        slots = torch.split(out, list(sizes))
        self._exchange([part] * self.world_size, slots)
        slots[self.rank].copy_(part)
        return out

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
        group = dist.new_group(ranks=global_ranks, backend=dist.get_backend(self.group), use_local_synchronization=False)
        if dist.get_rank() not in global_ranks:
            return None
        return TorchDistributedTransport(group=group, ranks=global_ranks)
