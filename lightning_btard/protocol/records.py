"""One schema per kind of record a peer reads from another, checked before any use.

Every record on the board or in a message comes from a peer that may be Byzantine and knows this code. A check
here is exact (``type(x) is int``, not ``isinstance``: a bool or a tensor is not a step; lengths, index ranges,
shapes and dtypes as the protocol fixes them); a record that fails is evidence against its author, never an
exception on an honest peer. Each function returns the record's parts when it is well formed, else ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "DISPUTE_KINDS",
    "EVIDENCE_KINDS",
    "HASH_BYTES",
    "SIG_BYTES",
    "accusation",
    "commitment",
    "is_bytes",
    "is_index",
    "publication",
    "aggregate_record",
    "validation_claims",
]

HASH_BYTES = 32
"""A digest (:func:`~lightning_btard.protocol.digest.digest`)."""
SIG_BYTES = 64
"""An Ed25519 signature."""
DISPUTE_KINDS = ("missing-part", "missing-aggregate", "missing-own-part")
"""Unprovable claims ("you sent me nothing valid"): no evidence, the accused publishes a copy."""
EVIDENCE_KINDS = ("bad-part", "equivocation", "lying-numbers", "bad-own-part", "lying-own-numbers")
"""Provable accusations, each with its evidence: the accused's own signed words."""


def is_index(x: Any, n: int) -> bool:
    """A member index: an exact ``int`` in ``[0, n)`` (no negative indexing, no bool, no tensor)."""
    return type(x) is int and 0 <= x < n


def is_bytes(x: Any, size: int) -> bool:
    return type(x) is bytes and len(x) == size


def _pair(x: Any) -> bool:
    return type(x) in (tuple, list) and len(x) == 2


def commitment(entry: Any, step: int, peer: int, n: int) -> Optional[tuple[list[bytes], bytes, bytes]]:
    """``((step, peer, hashes, mprng_commitment), signature)``: ``n`` part hashes; returns hashes, commitment,
    signature."""
    if not _pair(entry) or type(entry[0]) not in (tuple, list) or len(entry[0]) != 4:
        return None
    (r_step, r_peer, hashes, commit), sig = entry
    if type(r_step) is not int or r_step != step or type(r_peer) is not int or r_peer != peer:
        return None
    if type(hashes) is not list or len(hashes) != n or not all(is_bytes(h, HASH_BYTES) for h in hashes):
        return None
    if not is_bytes(commit, HASH_BYTES) or not is_bytes(sig, SIG_BYTES):
        return None
    return list(hashes), commit, sig


def aggregate_record(entry: Any) -> Optional[tuple[bytes, tuple[int, float], bytes]]:
    """``([hash, iterations, residual], signature)``: the aggregate's hash (signed) and its solver's iterations (an
    exact non-negative int) and residual (a finite non-negative float); returns hash, (iterations, residual),
    signature."""
    if not _pair(entry) or type(entry[0]) not in (tuple, list) or len(entry[0]) != 3 or not is_bytes(entry[1], SIG_BYTES):
        return None
    h, iterations, residual = entry[0]
    if not is_bytes(h, HASH_BYTES) or type(iterations) is not int or not 0 <= iterations < 2**31:
        return None
    if type(residual) is not float or not math.isfinite(residual) or residual < 0:
        return None
    return h, (iterations, residual), entry[1]


def _evidence_tensor(x: Any, max_numel: int) -> bool:
    """A part as it was received (possibly of a wrong shape or dtype: that is what it proves), of bounded size. (Its
    dtype is one the record codec decodes: no other reaches the protocol.)"""
    return isinstance(x, Tensor) and x.numel() <= max_numel


def accusation(item: Any, accuser: int, n: int, sizes: Sequence[int]) -> Optional[tuple[str, int, Any]]:
    """``(kind, accused, evidence)`` by member ``accuser``: a known kind, another member, evidence of its kind's
    shape (``None`` for a dispute; a received part and its signature; a hash and its signature; a well-formed part
    and its signature for lying numbers)."""
    if type(item) not in (tuple, list) or len(item) != 3:
        return None
    kind, accused, evidence = item
    if type(kind) is not str or not is_index(accused, n) or accused == accuser:
        return None
    if kind in DISPUTE_KINDS:
        return (kind, accused, None) if evidence is None else None
    if kind not in EVIDENCE_KINDS or not _pair(evidence) or not is_bytes(evidence[1], SIG_BYTES):
        return None
    content = evidence[0]
    if kind == "equivocation":
        return (kind, accused, (content, evidence[1])) if is_bytes(content, HASH_BYTES) else None
    if kind in ("lying-numbers", "lying-own-numbers"):
        size = sizes[accuser] if kind == "lying-numbers" else sizes[accused]  # the part: the accuser's or the accused's own
        well_formed = isinstance(content, Tensor) and content.dtype == torch.float32 and tuple(content.shape) == (size,)
        return (kind, accused, (content, evidence[1])) if well_formed else None
    return (kind, accused, (content, evidence[1])) if _evidence_tensor(content, 2 * max(sizes) + 16) else None


def publication(record: Any, author: int, n: int, max_items: int) -> Optional[dict[tuple[int, str], Any]]:
    """A disputed member's published copies: a list of ``(claimant, kind, copy)`` (at most ``max_items``, one per
    claimant and kind); returns ``{(claimant, kind): copy}``."""
    if type(record) is not list or len(record) > max_items:
        return None
    out: dict[tuple[int, str], Any] = {}
    for entry in record:
        if type(entry) not in (tuple, list) or len(entry) != 3:
            return None
        claimant, kind, copy = entry
        if not is_index(claimant, n) or claimant == author or kind not in DISPUTE_KINDS or (claimant, kind) in out:
            return None
        out[(claimant, kind)] = copy
    return out


def validation_claims(record: Any, max_items: int) -> Optional[list[int]]:
    """A validator's accused targets: a list of distinct peer ids (exact ints), at most ``max_items``."""
    if type(record) is not list or len(record) > max_items or not all(type(t) is int for t in record):
        return None
    return list(dict.fromkeys(record))
