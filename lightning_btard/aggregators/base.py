"""The aggregation interface: ``[n, d]`` parts and ``[n]`` weights in, ``[d]`` and its statistics out.

A robust aggregation rule is one object with this interface, registered under a name, so that a
new rule (median, trimmed mean, Krum, ...) is one new file and no change to the strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

from torch import Tensor

from lightning_btard.errors import UserError

__all__ = ["AggregationResult", "Aggregator", "AGGREGATORS", "NO_STATS", "register_aggregator", "resolve_aggregator", "STAT_KEYS",
           "used_rows"]

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


def resolve_aggregator(spec: Union[str, Aggregator], own: Optional[Mapping[str, Any]] = None, **common: Any) -> Aggregator:
    """An aggregator from a registered name or an object as is.

    A name is built with ``own`` (its own options, e.g. ``{"f": 3}`` for Krum: an option it does not accept is an
    error naming those it does) and with those of the ``common`` options (the strategy's ``tau``, ``eps``,
    ``max_iters``) it accepts; ``own`` wins where both give one.
    """
    own = dict(own or {})
    if isinstance(spec, str):
        if spec not in AGGREGATORS:
            raise UserError(f"unknown aggregator {spec!r}; registered: {sorted(AGGREGATORS)}")
        cls = AGGREGATORS[spec]
        accepted = tuple(getattr(cls, "options", ()))
        unknown = sorted(set(own) - set(accepted))
        if unknown:
            raise UserError(f"aggregator {spec!r} has no option(s) {unknown}; its options: {list(accepted) or 'none'}")
        return cls(**{**{k: v for k, v in common.items() if k in accepted}, **own})
    if own:
        raise UserError("aggregator_options apply to an aggregator given by name; an object comes configured")
    if not callable(spec):
        raise TypeError(f"aggregator must be a registered name or a callable (parts, weights) -> AggregationResult, got {spec!r}")
    return spec


def used_rows(parts: Tensor, weights: Optional[Tensor]) -> Tensor:
    """The rows a rule aggregates: all, or those whose weight is positive. Weights here are a mask (0 leaves a row
    out: an abstaining or malformed peer); rules that are not weighted means refuse other weights."""
    if weights is None:
        return parts
    w = weights.to(parts.device)
    if not bool(((w == 0) | (w == 1)).all()):
        raise UserError("this aggregator takes weights as a 0/1 mask of the rows to use")
    rows = parts[w > 0]
    if rows.shape[0] == 0:
        raise ValueError("no rows to aggregate (every weight is 0)")
    return rows


NO_STATS: dict[str, float] = {"clipped": 0.0, "iterations": 0.0, "residual": 0.0}
"""The statistics of a rule that has none of :data:`STAT_KEYS`."""
