"""The torch.distributed group: ranks launched together; a private process group of the active ranks.

torch.distributed cannot continue without a silent rank (gloo and NCCL collectives stall for everyone until
their timeout), so :meth:`recover` re-raises the failure: the run stops with it.
"""

from __future__ import annotations

import torch.distributed as dist

from lightning_btard.groups.base import Group
from lightning_btard.protocol.membership import Membership
from lightning_btard.transports.torch_distributed import TorchDistributedTransport

__all__ = ["TorchGroup"]


class TorchGroup(Group):
    """Peers are the global ranks of the default process group; after a ban, a new group of the remaining ranks."""

    recoverable = False

    def __init__(self, backend: str) -> None:
        transport = TorchDistributedTransport()
        super().__init__(Membership(peers=list(range(transport.world_size))), transport, dist.get_rank())
        self.backend = backend

    def rebuild(self) -> None:
        """A private process group of the remaining ranks (only they call this: no stall on the banned)."""
        active = self.membership.active
        group = dist.new_group(ranks=active, backend=self.backend, use_local_synchronization=True)
        assert isinstance(group, dist.ProcessGroup), "only the active ranks rebuild the group"
        self.transport = TorchDistributedTransport(group=group, ranks=active)
