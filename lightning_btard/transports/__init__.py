"""Transports: torch.distributed, in-process (tests); hivemind comes next."""

from lightning_btard.transports.base import Transport, TransportError
from lightning_btard.transports.in_process import InProcessHub, InProcessTransport, run_peers
from lightning_btard.transports.torch_distributed import TorchDistributedTransport

__all__ = ["InProcessHub", "InProcessTransport", "Transport", "TransportError", "TorchDistributedTransport", "run_peers"]
