"""Random projections for verifying a CenteredClip aggregate without sending the vectors.

Every peer ``i`` publishes, for part ``j``, ``s_i = c_i <z, g_i - G>`` (``c_i = min(1, tau/||g_i - G||)``)
and ``||g_i - G||`` for ``k`` secret random directions ``z`` drawn after ``G`` was committed. At the
CenteredClip fixed point ``sum_i w_i c_i (g_i - G) = 0``, so ``sum_i w_i s_i`` is zero up to the
solver's residual and float rounding; an aggregate off the fixed point leaves a projection of the
order of its error, which a direction chosen after the commitment cannot miss (probability ~
tolerance / error per direction). Dot products run in float32 over short chunks summed in float64:
about 3e-7 relative error, against 1e-5 for one long float32 dot and 10x the time in float64.

The directions are uniform on ``[-sqrt(3), sqrt(3)]`` per coordinate (unit variance), not random signs: a sign
vector is orthogonal to a sparse or structured error with a large probability (``e_1 - e_2``: 1/2 per direction;
the constant vector: ~12% per direction for a part of 42 entries), so a Byzantine aggregator that shifts its
aggregate along such a vector, by any amount, passed the check that often (found by the adversary tests: a shift of
20,000 tau along the constant vector passed in ~2% of rounds). A continuous distribution has no such atom: for any
unit ``u``, ``<z, u>`` has a density bounded by a constant (K. Ball's cube slicing: at most ``1/sqrt(2)`` here),
so ``P(|<z, u>| < t) <= sqrt(2) t`` whatever ``u`` the attacker chose before the draw. The uniform distribution is
strictly sub-Gaussian (variance proxy = variance = 1), so the Hoeffding-type tails every tolerance here uses
(``P(|<z, R>| > t ||R||) <= 2 exp(-t^2/2)``) hold unchanged.
The float64-accurate dot products and norms are in :mod:`.accurate_sums` (CenteredClip's Gram matrix uses them too).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import Tensor

from lightning_btard.ops.accurate_sums import accurate_dots, accurate_norms
from lightning_btard.ops.centered_clip import clip_coefficients
from lightning_btard.ops.norms import unsure_norms
from lightning_btard.ops.workspace import SCRATCH

__all__ = [
    "LazyDirections",
    "ProjectionCheck",
    "aggregate_norm_bound",
    "accurate_dots",
    "accurate_norms",
    "clipped_projections",
    "random_directions",
]

_SQRT3 = math.sqrt(3.0)


def random_directions(
    seed: bytes, part: int, size: int, k: int, device: torch.device | str = "cpu", out: Optional[Tensor] = None
) -> Tensor:
    """``[k, size]`` random directions for part ``part``, uniform on ``[-sqrt(3), sqrt(3)]`` per coordinate (see the
    module doc for why not signs), the same on every peer for the same ``seed`` (written into ``out`` when given: a
    float32 ``[k, size]`` buffer)."""
    key = hashlib.blake2b(seed + part.to_bytes(8, "little"), digest_size=16).digest()
    z = out if out is not None else torch.empty(k, size, dtype=torch.float32, device=device)
    flat = z.view(-1)
    # AES-128 in counter mode (a keyed stream of 32 random bits per coordinate, the same everywhere for the same key),
    # as signed integers scaled onto [-sqrt(3), sqrt(3)): float32 rounding leaves atoms of at most 2^-24 of the mass,
    # as float32 uniforms have. With AES-NI, 4.5 ms per 5.6M coordinates here, against 9 for numpy's fastest float32
    # uniforms and 14 for torch's CPU generator; every peer draws k x (all parameters) of them in each verified step.
    # Chunks of 1 MB stay in cache and need no buffer of the directions' size.
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    bits, scaled = _chunk_buffers()
    for start in range(0, flat.numel(), _CHUNK):
        m = min(_CHUNK, flat.numel() - start)
        encryptor.update_into(_ZEROS[: 4 * m], bits[1])
        if flat.device.type == "cpu":
            flat[start : start + m].copy_(bits[0][:m]).mul_(_SCALE)
        else:
            flat[start : start + m].copy_(scaled[:m].copy_(bits[0][:m]).mul_(_SCALE))
    return z


_CHUNK = 1 << 18  # coordinates per chunk (1 MB)
_ZEROS = memoryview(bytes(4 * _CHUNK))
_SCALE = _SQRT3 / 2.0**31


_LOCAL = threading.local()


def _chunk_buffers() -> tuple[tuple[Tensor, bytearray], Tensor]:
    """This thread's chunk buffers (simulated peers draw directions in parallel threads)."""
    if not hasattr(_LOCAL, "buffers"):
        raw = bytearray(4 * _CHUNK + 16)  # update_into wants room for a block beyond the input
        _LOCAL.buffers = (torch.frombuffer(raw, dtype=torch.int32)[:_CHUNK], raw), torch.empty(_CHUNK, dtype=torch.float32)
    return _LOCAL.buffers


class LazyDirections(Sequence[Tensor]):
    """A round's directions per part (``[k, size_j]`` for part ``j``), drawn when asked for into one buffer of the
    largest part's size: a peer holds ``k x (largest part)`` floats instead of ``k x (all parameters)``.

    ``directions[j]`` is valid until another part's is asked for (then ``j``'s is redrawn when asked again): read it
    right before use."""

    def __init__(self, seed: bytes, sizes: Sequence[int], k: int, device: torch.device | str, buffer: Tensor) -> None:
        self.seed, self.sizes, self.k, self.device = seed, list(sizes), int(k), device
        if buffer.numel() < self.k * max(self.sizes, default=0):
            raise ValueError("the buffer is smaller than k x the largest part")
        self._buffer, self._held = buffer, -1
        self.draws = 0
        """How many parts were drawn (a part asked for again after another is drawn again)."""

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, j):  # type: ignore[override]
        if not isinstance(j, int):
            raise TypeError("directions are indexed by one part")
        size = self.sizes[j]
        view = self._buffer[: self.k * size].view(self.k, size)
        if self._held != j:
            random_directions(self.seed, j, size, self.k, self.device, out=view)
            self._held, self.draws = j, self.draws + 1
        return view


_PROJECTION_CHUNK_BYTES = 1 << 20
"""The numbers are computed on column chunks of the parts this large (on a CPU), which stay in the core's cache: each
chunk's differences ``g_i - G`` are never written out in full, and the directions are read once for ``s`` and ``p``."""


def clipped_projections(z: Tensor, g: Tensor, aggregate: Tensor, tau: float) -> tuple[Tensor, Any, Tensor]:
    """A peer's published numbers for one part: ``s = c <z, g - G>`` (``[k]``), ``||g - G||`` and ``p = <z, g>``.

    With ``g`` of shape ``[n, size]`` (every sender's part, as its aggregator holds them): ``s`` and ``p`` of
    shape ``[n, k]`` and the norms as a float64 ``[n]`` tensor. The products and norms are float32 over 1024-element
    pieces summed in float64 (as :mod:`.accurate_sums`), one chunk of columns at a time."""
    single = g.dim() == 1
    gs = g[None] if single else g
    n, size = gs.shape
    k = z.shape[0]
    dtype, device = torch.float32, g.device
    columns = size if device.type != "cpu" else max(1024, _PROJECTION_CHUNK_BYTES * torch.get_num_threads() // (4 * (2 * n + k)) // 1024 * 1024)
    columns = max(1, min(columns, size))
    buf = SCRATCH.view("rows", (n, columns), dtype, device)
    pieces = size // 1024
    s_pieces = torch.empty(pieces, n, k, dtype=dtype, device=device)
    p_pieces = torch.empty(pieces, n, k, dtype=dtype, device=device)
    norm_pieces = torch.empty(n, pieces, dtype=dtype, device=device)
    s64 = torch.zeros(n, k, dtype=torch.float64, device=device)
    p64 = torch.zeros(n, k, dtype=torch.float64, device=device)
    sq64 = torch.zeros(n, dtype=torch.float64, device=device)
    for start in range(0, size, columns):
        end = min(size, start + columns)
        gc = gs[:, start:end].to(dtype)
        diff = torch.sub(gc, aggregate[start:end].to(dtype), out=buf[:, : end - start])
        m = (end - start) // 1024
        if m:
            at, whole = slice(start // 1024, start // 1024 + m), m * 1024
            zp = z[:, start : start + whole].view(k, m, 1024).permute(1, 2, 0)  # [m, 1024, k]: strided views, no copies
            torch.bmm(diff[:, :whole].view(n, m, 1024).transpose(0, 1), zp, out=s_pieces[at])
            torch.bmm(gc[:, :whole].reshape(n, m, 1024).transpose(0, 1), zp, out=p_pieces[at])
            torch.linalg.vector_norm(diff[:, :whole].view(n, m, 1024), dim=2, out=norm_pieces[:, at])
        if m * 1024 < end - start:
            rest_z = z[:, start + m * 1024 : end].double()
            rest = diff[:, m * 1024 :].double()
            s64 += rest @ rest_z.T
            p64 += gc[:, m * 1024 :].double() @ rest_z.T
            sq64 += rest.square().sum(1)
    s64 += s_pieces.sum(0, dtype=torch.float64)
    p64 += p_pieces.sum(0, dtype=torch.float64)
    norms = (sq64 + norm_pieces.double().square().sum(1)).sqrt()
    for i in unsure_norms(norms, size).nonzero().flatten().tolist():  # squares lost to float32: redo (rare)
        norms[i] = torch.linalg.vector_norm(gs[i].to(dtype) - aggregate.to(dtype), dtype=torch.float64)
    c = clip_coefficients(norms, tau)
    s = s64 * c[:, None]
    return (s[0], float(norms[0]), p64[0]) if single else (s, norms, p64)


def aggregate_norm_bound(part_norms: Tensor, weights: Tensor, tau: float) -> float:
    """A bound on ``||v||`` for the CenteredClip fixed point ``v`` of parts with these norms and weights, which parts
    holding less than half the weight cannot raise.

    With ``S`` the smallest norm such that the parts of norm ``<= S`` hold ``W_S > W/2`` of the weight ``W``:
    ``||v|| <= max(S + tau, S W / (2 W_S - W))``. (If ``||v|| > S + tau``, each of those parts is clipped and pulls
    ``v`` back along ``-v/||v||`` by at least ``tau (||v|| - S) / (||v|| + S)`` per unit weight, the others push it
    out by at most ``tau``: the balance gives the second term.) ``S`` is at most the largest norm of the parts
    outside any minority, so a Byzantine minority sending huge parts does not move the bound."""
    keep = weights.double() > 0
    w, norms = weights.double()[keep], part_norms.double()[keep]
    if not len(w):
        return math.inf
    order = torch.argsort(norms)
    mass = torch.cumsum(w[order], 0)
    total = float(mass[-1])
    first = int(torch.searchsorted(mass, torch.tensor([total / 2], dtype=mass.dtype), right=True)[0])
    first = min(first, len(w) - 1)
    s, held = float(norms[order][first]), float(mass[first])  # held <= W_S: the bound stays valid on ties
    return max(s + tau, s * total / (2 * held - total))


@dataclass(frozen=True)
class ProjectionCheck:
    """The check ``|sum_i w_i s_i| <= tolerance`` for every direction of one part.

    ``tolerance = sigmas * sum_i w_i * bound + rounding * sum_i w_i c_i ||g_i - G||``: the first term
    covers an honest aggregate whose residual is at most ``bound`` (``<z, R>`` is ``N(0, ||R||^2)``,
    so ``sigmas=7`` errs with probability ~3e-12), the second the float error of the published numbers.
    """

    tau: float
    sigmas: float = 7.0
    rounding: float = 2e-6

    def tolerance(self, weights: Tensor, norms: Tensor, bound: float) -> float:
        w = weights.double()
        c = clip_coefficients(norms.double(), self.tau)
        return self.sigmas * float(w.sum()) * bound + self.rounding * float((w * c * norms.double()).sum())

    def sums(self, weights: Tensor, s: Tensor) -> Tensor:
        """``[k]``: ``sum_i w_i s_i`` per direction, from ``s`` of shape ``[n, k]``."""
        return (weights.double()[:, None] * s.double()).sum(0)

    def passes(self, weights: Tensor, s: Tensor, norms: Tensor, bound: float, slack: Optional[Tensor] = None) -> bool:
        """``slack`` (``[k]``): what the checks of the published ``s`` themselves accept, added per direction."""
        tol = self.tolerance(weights, norms, bound)
        allowed = tol + (slack.double() if slack is not None else 0.0)
        return bool((self.sums(weights, s).abs() <= allowed).all()) and math.isfinite(tol)
