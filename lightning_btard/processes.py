"""The devices, processes and ranks of a BTARD run, as Lightning's DDP strategy has them.

On torch.distributed Lightning launches one process per device (``popen`` re-runs the script, like its ``ddp``; or
``spawn``/``fork``/``forkserver``). On hivemind every peer is its own ``btard fit`` on one device, started by its owner:
there is no launcher. Either way Lightning's distributed sampler and ``sync_dist`` logging see a distributed run.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from typing_extensions import override

from lightning_btard import compat
from lightning_btard.errors import UserError
from lightning_btard.lightning_package import ClusterEnvironment

__all__ = ["Processes"]


class Processes:
    """Mixed into :class:`~lightning_btard.BTARDStrategy` (which provides the backend, the start method and
    Lightning's ``parallel_devices``, ``cluster_environment`` and ranks)."""

    backend: str
    parallel_devices: Optional[list[torch.device]]
    cluster_environment: Optional[ClusterEnvironment]
    local_rank: int
    node_rank: int
    global_rank: int
    world_size: int
    _num_nodes: int
    _start_method: str
    _process_group_backend: Optional[str]
    _launcher: Any

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def is_distributed(self) -> bool:
        """Tells Lightning to install its distributed sampler and to sync ``self.log(sync_dist=True)``."""
        return True

    @property
    @override
    def is_global_zero(self) -> bool:
        """On hivemind every peer is its own rank zero (as in lightning-hivemind): each is its own ``btard fit``, often on
        someone else's machine, and shows its progress bar, writes its logs and saves its checkpoints; nothing depends
        on one peer staying. On torch.distributed, rank 0."""
        return self.backend == "hivemind" or self.global_rank == 0

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> str:
        return self._process_group_backend or ("nccl" if self.root_device.type == "cuda" else "gloo")

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self.backend == "hivemind":
            if self.num_processes != 1:
                raise UserError(
                    f"backend='hivemind' runs one device per process (got devices={self.num_processes}): start one "
                    "`btard fit` per device, or use `python -m lightning_btard.swarm` to start several on this machine"
                )
            self._launcher = None
        elif self._start_method == "popen":
            self._launcher = compat.SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = compat.MultiProcessingLauncher(self, start_method=self._start_method)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        compat.set_rank_zero(self.global_rank)
