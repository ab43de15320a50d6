"""Transports: torch.distributed, hivemind (``transports/hivemind.py``, imported on demand), in-process (tests)."""

from lightning_btard.transports.base import Transport, TransportError
from lightning_btard.transports.in_process import InProcessHub, InProcessTransport
from lightning_btard.transports.torch_distributed import TorchDistributedTransport

__all__ = ["InProcessHub", "InProcessTransport", "Transport", "TransportError", "TorchDistributedTransport"]
