"""lightning-btard: Byzantine-tolerant distributed training (BTARD-SGD) as a PyTorch Lightning strategy.

``Trainer(strategy=BTARDStrategy(tau=1.0))`` (or ``strategy="btard"``) replaces DDP's gradient
averaging with ButterflyClip: CenteredClip aggregation of every part of the gradient.
``BTARDSimStrategy(num_peers=16)`` (``strategy="btard_sim"``) simulates the peers in one process.
"""

from lightning_btard.aggregators import AggregationResult, Aggregator, register_aggregator
from lightning_btard.ops.centered_clip import CenteredClipResult, centered_clip, centered_clip_with_stats
from lightning_btard.sim_strategy import BTARDSimStrategy
from lightning_btard.strategy import BTARDStrategy

__version__ = "0.2.0"

__all__ = [
    "AggregationResult",
    "Aggregator",
    "BTARDSimStrategy",
    "BTARDStrategy",
    "CenteredClipResult",
    "centered_clip",
    "centered_clip_with_stats",
    "register_aggregator",
]
