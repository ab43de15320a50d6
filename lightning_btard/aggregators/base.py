"""The aggregation interface: ``[n, d]`` parts and ``[n]`` weights in, ``[d]`` and its statistics out.

A robust aggregation rule is one object with this interface, registered under a name, so that a
new rule (median, trimmed mean, Krum, ...) is one new file and no change to the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Union, runtime_checkable

from torch import Tensor

from lightning_btard.errors import UserError

__all__ = ["AggregationResult", "Aggregator", "AGGREGATORS", "register_aggregator", "resolve_aggregator", "STAT_KEYS"]

STAT_KEYS = ("clipped", "iterations", "residual")
"""Statistics every aggregator reports (0 where a rule has no such notion), in this order."""


@dataclass(frozen=True)
class AggregationResult:
    value: Tensor
    """``[d]`` aggregate."""
    stats: dict[str, float] = field(default_factory=dict)
    """At least :data:`STAT_KEYS`."""


@runtime_checkable
class Aggregator(Protocol):
    """Anything callable as ``aggregator(parts, weights) -> AggregationResult``."""

    def __call__(self, parts: Tensor, weights: Optional[Tensor] = None) -> AggregationResult: ...


AGGREGATORS: dict[str, Callable[..., Aggregator]] = {}


def register_aggregator(name: str) -> Callable[[type], type]:
    """Class decorator: make an aggregator available by ``name`` (``BTARDStrategy(aggregator=name)``)."""

    def wrap(cls: type) -> type:
        AGGREGATORS[name] = cls
        return cls

    return wrap


def resolve_aggregator(spec: Union[str, Aggregator], **options: float) -> Aggregator:
    """An aggregator from a registered name (built with those ``options`` it accepts) or an object as is."""
    if isinstance(spec, str):
        if spec not in AGGREGATORS:
            raise UserError(f"unknown aggregator {spec!r}; registered: {sorted(AGGREGATORS)}")
        cls = AGGREGATORS[spec]
        accepted = getattr(cls, "options", ())
        return cls(**{k: v for k, v in options.items() if k in accepted})
    if not callable(spec):
        raise TypeError(f"aggregator must be a registered name or a callable (parts, weights) -> AggregationResult, got {spec!r}")
    return spec
