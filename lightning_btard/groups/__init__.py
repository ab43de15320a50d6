"""Groups: who is in the run on each backend, and the transport over them (see :mod:`.base`)."""

from lightning_btard.groups.base import Group, NoMajority, Recovery
from lightning_btard.groups.in_process import InProcessGroup, InProcessRegistry

__all__ = ["Group", "InProcessGroup", "InProcessRegistry", "NoMajority", "Recovery"]
