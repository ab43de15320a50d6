"""torch.distributed transport: gloo on CPU, NCCL on GPU, over a process group of the members.

Tensors of known shapes go point to point; board records go through the record codec (:mod:`.codec`), never
through ``all_gather_object``'s pickle, which would run whatever code a rank sends on every other rank. gloo's
own framing is trusted (a rank that breaks it makes the collective fail for everyone, as a silent rank does);
nothing in the contents is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_btard.ops.workspace import Workspace
from lightning_btard.transports.base import Transport
from lightning_btard.transports.codec import MAX_RECORD_BYTES, decode_record, encode_record

__all__ = ["TorchDistributedTransport"]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class TorchDistributedTransport(Transport):
    """Collectives over ``group`` (default: the whole world), whose member order is the global rank order."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, ranks: Optional[Sequence[int]] = None,
                 max_record_bytes: int = MAX_RECORD_BYTES, board_slot: Optional[int] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchDistributedTransport needs an initialised torch.distributed process group")
        self.group = group
        self.ranks = list(ranks) if ranks is not None else list(range(dist.get_world_size()))
        self._rank = self.ranks.index(dist.get_rank())
        self._buffers = Workspace()
        self.max_record_bytes = int(max_record_bytes)
        self.board_slot = int(board_slot) if board_slot is not None else max(4096, 256 * len(self.ranks))
        """Bytes of a board record that travel with its length in the first message (the same on every member: it
        depends on the member count only): a step's records fit, evidence and published parts take a second."""

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

    def _device(self) -> torch.device:
        """Where collectives' tensors live: the current CUDA device under NCCL, else the CPU."""
        nccl = dist.get_backend(self.group) == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every member's record (:mod:`.codec`, never pickle), each straight from its author (:meth:`_exchange`): one
        message per pair carries the record's length and the record, or its first :attr:`board_slot` bytes; the rest of
        a longer one follows in a second message (the announced length less the slot), capped at ``max_record_bytes``
        before anything is allocated. A record that is too large or does not decode is ``None`` (a malformed record
        of its sender).

        Not gloo's ``all_gather``: that is a ring, where each rank forwards the others' records, so a hostile rank
        could alter an honest member's record on its way to the members after it (and it costs two of them, sizes
        then bytes: 7.0 ms per board round here against 1.2 for one direct exchange). Straight from the author,
        nobody can alter another's record; an author can still send different records to different members
        (equivocation, as on hivemind's board: the README's "Not yet")."""
        data = encode_record(obj)
        n, me, slot = self.world_size, self.rank, self.board_slot
        device = self._device()
        first = torch.zeros(8 + slot, dtype=torch.uint8)
        first[:8] = torch.frombuffer(bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        if data:  # the record, or its first slot bytes
            first[8 : 8 + min(len(data), slot)] = torch.frombuffer(bytearray(data[:slot]), dtype=torch.uint8)
        first = first.to(device)
        firsts = torch.empty(n, 8 + slot, dtype=torch.uint8, device=device)
        self._exchange([[first]] * n, [[row] for row in firsts.unbind(0)])
        firsts[me].copy_(first)
        heads = bytes(firsts[:, :8].cpu().numpy().reshape(-1))
        lengths = [int.from_bytes(heads[8 * i : 8 * i + 8], "little", signed=True) for i in range(n)]
        # the longer records: each one's sender sends its rest to all, each receiver takes what was announced to it
        rest = [torch.empty(m - slot, dtype=torch.uint8, device=device) if i != me and slot < m <= self.max_record_bytes
                else None for i, m in enumerate(lengths)]
        mine = slot < len(data) <= self.max_record_bytes
        if mine or any(r is not None for r in rest):
            tail = torch.frombuffer(bytearray(data[slot:]), dtype=torch.uint8).to(device) if mine else None
            self._exchange([[tail] if tail is not None else [] for _ in range(n)],
                           [[r] if r is not None else [] for r in rest])
        records: list[Any] = []
        for i, m in enumerate(lengths):
            if not 0 <= m <= self.max_record_bytes:
                records.append(None)
                continue
            body = bytes(firsts[i, 8 : 8 + min(m, slot)].cpu().numpy())
            if m > slot:
                body = data if i == me else body + bytes(rest[i].cpu().numpy())  # type: ignore[union-attr]
            records.append(decode_record(body, max_bytes=self.max_record_bytes))
        return records

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Member ``src``'s record on every member (``None`` where it is too large or does not decode); ``src`` keeps
        its own object."""
        device = self._device()
        data = encode_record(obj) if self.rank == src else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        dist.broadcast(size, src=self.ranks[src], group=self.group)
        n = int(size.item())
        if not 0 <= n <= self.max_record_bytes:
            return obj if self.rank == src else None
        buf = torch.zeros(n, dtype=torch.uint8, device=device)
        if self.rank == src and n:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=self.ranks[src], group=self.group)
        return obj if self.rank == src else decode_record(bytes(buf.cpu().numpy()), max_bytes=self.max_record_bytes)

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
        return TorchDistributedTransport(group=group, ranks=global_ranks, max_record_bytes=self.max_record_bytes)
