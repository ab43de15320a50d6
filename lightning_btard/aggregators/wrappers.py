"""What bucketing and nearest-neighbour mixing share: an inner rule, given by name with its own options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from lightning_btard.aggregators.base import Aggregator, resolve_aggregator
from lightning_btard.errors import UserError


def inner_rule(inner: str, inner_options: Optional[Mapping[str, Any]], wrapper: str) -> Aggregator:
    """The registered rule a wrapper applies after its own step (not another wrapper of the same kind)."""
    if inner == wrapper:
        raise UserError(f"{wrapper} cannot wrap itself")
    return resolve_aggregator(inner, dict(inner_options or {}))
