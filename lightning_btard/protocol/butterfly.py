"""ButterflyClip: one aggregation round of BTARD without verification.

Every peer cuts its flat gradient into ``n`` parts and sends part ``j`` to peer ``j`` (the
aggregator of part ``j``); peer ``j`` aggregates the ``n`` copies of its part (CenteredClip, or any
aggregator); every peer gathers all aggregated parts. Each peer sends ``(n-1)/n`` of its gradient
and receives the same amount back, like a ring all-reduce. The aggregators' statistics travel with
the parts, so every peer learns every part's statistics without another collective.

``topology="server"`` is the parameter-server baseline on the same two collectives: part 0 is the whole vector
and the others are empty, so peer 0 aggregates everybody's whole gradient and sends the result to all (the
paper's "CenteredClip with a parameter server"; peer 0 is trusted: nothing checks it).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from lightning_btard.aggregators.base import STAT_KEYS, AggregationResult, Aggregator
from lightning_btard.ops.finite import all_finite, finite_rows
from lightning_btard.ops.partition import part_sizes
from lightning_btard.transports.base import Transport

__all__ = ["ButterflyStats", "ROUND_STAT_KEYS", "TOPOLOGIES", "butterfly_aggregate"]

ROUND_STAT_KEYS = STAT_KEYS + ("malformed",)
"""Per-part statistics of a round: the aggregator's, and how many parts were malformed (non-finite)."""


@dataclass
class ButterflyStats:
    """What one round did, identical on every peer except the timings."""

    part_stats: Tensor
    """``[n, len(ROUND_STAT_KEYS)]``: each part's statistics (clipped, iterations, residual, malformed)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase on this peer: scatter, aggregate, gather."""
    bytes_sent: int = 0

    def summary(self) -> dict[str, float]:
        """Totals over parts: clipped rows summed, iterations and residual at their maximum."""
        s = self.part_stats
        out = {
            "clipped": float(s[:, 0].sum()),
            "iterations": float(s[:, 1].max()),
            "residual": float(s[:, 2].max()),
            "malformed": float(s[:, 3].sum()),
        }
        out.update({f"time_{k}": v for k, v in self.seconds.items()})
        return out


def _aggregate_finite(
    received: Tensor, aggregator: Aggregator, weights: Optional[Tensor]
) -> tuple[AggregationResult, int]:
    """Aggregate, leaving out non-finite (malformed) parts; returns the result and how many parts were left out.

    The fast path checks only the result (a NaN or Inf in an input shows in the mean, and CenteredClip
    refuses it); the rows are checked one by one only when that fails.
    """
    try:
        result = aggregator(received, weights)
        if all_finite(result.value):
            return result, 0
        failure: Optional[Exception] = None
    except ValueError as e:
        failure = e
    ok = finite_rows(received)
    malformed = int((~ok).sum())
    if malformed == 0:
        if failure is not None:
            raise failure
        return result, 0
    if malformed == received.shape[0]:
        # nothing left to aggregate: training has diverged on every peer (e.g. an undefended mean under attack)
        warnings.warn("every part of this round is non-finite: the aggregate is NaN (training has diverged)", RuntimeWarning, stacklevel=2)
        nan = torch.full(received.shape[1:], float("nan"), dtype=received.dtype, device=received.device)
        return AggregationResult(nan, {k: 0.0 for k in STAT_KEYS}), malformed
    # a non-finite part is malformed: never aggregated (the verification protocol bans its sender)
    received = torch.where(ok[:, None], received, torch.zeros((), dtype=received.dtype, device=received.device))
    mask = ok.to(torch.float64)
    weights = mask if weights is None else weights.to(torch.float64) * mask
    return aggregator(received, weights), malformed


TOPOLOGIES = ("butterfly", "server")


def butterfly_aggregate(
    flat: Tensor,
    transport: Transport,
    aggregator: Aggregator,
    weights: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    topology: str = "butterfly",
) -> tuple[Tensor, ButterflyStats]:
    """Aggregate every peer's ``flat`` (same size everywhere) part by part; returns the aggregate and stats.

    ``out`` (may be ``flat`` itself: it is no longer read once the parts are sent) receives the aggregate.
    ``topology="server"``: peer 0 aggregates whole vectors (module docstring).
    """
    n, me = transport.world_size, transport.rank
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}, got {topology!r}")
    sizes = part_sizes(flat.numel(), n) if topology == "butterfly" else [flat.numel()] + [0] * (n - 1)
    t0 = time.perf_counter()
    received = transport.scatter_parts(flat, sizes)
    t1 = time.perf_counter()
    if sizes[me]:
        result, malformed = _aggregate_finite(received, aggregator, weights)
    else:  # nothing to aggregate here (the server topology's other peers)
        result, malformed = AggregationResult(received[0], {k: 0.0 for k in STAT_KEYS}), 0
    values = [result.stats[k] for k in STAT_KEYS] + [float(malformed)]
    stats = torch.tensor(values, dtype=torch.float64, device=flat.device)
    t2 = time.perf_counter()
    aggregate, part_stats = transport.gather_parts_with_extra(result.value.to(flat.dtype), stats, sizes, out=out)
    part_stats = part_stats.cpu()
    t3 = time.perf_counter()
    elem = flat.element_size()
    sent = (flat.numel() - sizes[me]) * elem + (n - 1) * sizes[me] * elem + (n - 1) * stats.numel() * 8
    return aggregate, ButterflyStats(
        part_stats=part_stats,
        seconds={"scatter": t1 - t0, "aggregate": t2 - t1, "gather": t3 - t2},
        bytes_sent=sent,
    )
