"""torch.distributed transport: gloo on CPU, NCCL on GPU, over a process group of the members."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

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

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def scatter_parts(self, flat: Tensor, sizes: Sequence[int]) -> Tensor:
        n, mine = self.world_size, sizes[self.rank]
        out = torch.empty(n * mine, dtype=flat.dtype, device=flat.device)
        dist.all_to_all_single(
            out, flat.contiguous(), output_split_sizes=[mine] * n, input_split_sizes=list(sizes), group=self.group
        )
        return out.view(n, mine)

    def gather_parts(self, part: Tensor, sizes: Sequence[int]) -> Tensor:
        width = max(sizes)
        padded = torch.zeros(width, dtype=part.dtype, device=part.device)
        padded[: part.numel()] = part
        out = torch.empty(self.world_size * width, dtype=part.dtype, device=part.device)
        dist.all_gather_single(out, padded, group=self.group)
        rows = out.view(self.world_size, width)
        return torch.cat([rows[i, :s] for i, s in enumerate(sizes)])

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
