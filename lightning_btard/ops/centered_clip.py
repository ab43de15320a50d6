"""CenteredClip: the robust aggregate of a few vectors, solved to a stated residual.

The aggregate of rows ``x_1..x_n`` with weights ``w_i`` is the fixed point ``v`` of

    sum_i w_i * min(1, tau / ||x_i - v||) * (x_i - v) = 0,

the minimiser of ``sum_i w_i * huber_tau(||x_i - v||)``. The released BTARD code took up to 500 plain
steps ``v += sum_i w_i c_i (x_i - v) / sum_i w_i`` from the coordinate-wise median, which stops short
of the fixed point when ``tau`` is small against the spread of the rows. The verification protocol
checks the fixed point, so here we solve for it: reweighting ``v = sum_i w_i c_i x_i / sum_i w_i c_i``
(the same fixed points, monotone in the Huber objective) reaches a residual of 1e-12 in tens of steps.

Speed: every iterate is an affine combination of the rows, so the iterations run on the small
``n x n`` Gram matrix (float64) and the full vectors are touched a constant number of times per pass.

1. The start: one Gram matrix of the rows themselves (it doubles as the finiteness check: a row's
   squared norm is finite exactly when its elements are, up to float32 overflow, which is checked
   element by element). From it come the distances between rows, the medoid ``x_k`` (the row of
   least median distance to the others: an honest row while most are honest), the Gram matrix
   centred on it, and a first solve there. When that centred matrix is accurate (the rows' norms
   are not too large against their distances: it is derived by differences), the start is the
   solve's combination of the rows (one ``gemv``); otherwise it is the medoid itself.
2. Each pass centres the rows on the current ``v`` (``d_i = x_i - v``), takes their Gram matrix,
   measures the residual on the full vectors, and if it is above the target solves in the span of
   the ``d_i`` and moves ``v``. Its float32 rounding is relative to the distances from ``v``, so a
   pass centred near the fixed point certifies it.

About 10 reads of the input when the start is accurate, 16 otherwise; the released code's start, the
coordinate-wise median, alone cost 25 (it is kept for rows beyond float32's comfortable range).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_btard.ops.accurate_sums import accurate_dots
from lightning_btard.ops.finite import finite_rows
from lightning_btard.ops.median import coordinate_median
from lightning_btard.ops.norms import safe_norm
from lightning_btard.ops.workspace import SCRATCH

__all__ = ["CenteredClipResult", "centered_clip", "centered_clip_with_stats", "clip_coefficients"]

_MAX_PASSES = 4


@dataclass(frozen=True)
class CenteredClipResult:
    """The aggregate and how it was reached."""

    value: Tensor
    """``[d]`` aggregate, in the input's dtype (float32 for half-precision inputs)."""
    iterations: int
    """Reweighting iterations in all passes (0 for ``tau=inf``)."""
    residual: float
    """``||sum_i w_i c_i (x_i - v)|| / sum_i w_i`` at the returned ``v``, measured on the full vectors."""
    clipped: int
    """How many rows (with a positive weight) lie farther than ``tau`` from ``v``."""
    converged: bool
    """Whether ``residual <= eps`` was reached within ``max_iters``."""


def clip_coefficients(distances: Tensor, tau: float) -> Tensor:
    """``min(1, tau / distance)``, with 1 for a zero distance."""
    if math.isinf(tau):
        return torch.ones_like(distances)
    return torch.where(distances > tau, tau / distances.clamp_min(torch.finfo(distances.dtype).tiny), 1.0)


def _validate(x: Tensor, tau: float, weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    if x.dim() != 2:
        raise ValueError(f"centered_clip expects an [n, d] tensor, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("centered_clip needs at least one row")
    if not (tau > 0):
        raise ValueError(f"tau must be positive (or inf), got {tau}")
    if not x.is_floating_point():
        raise ValueError(f"centered_clip expects a floating-point tensor, got {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if weights is None:
        w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    else:
        w = torch.as_tensor(weights, device=x.device).to(torch.float64).flatten()
        if w.shape[0] != x.shape[0]:
            raise ValueError(f"got {w.shape[0]} weights for {x.shape[0]} rows")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("weights must be finite and non-negative")
        if not float(w.sum()) > 0:
            raise ValueError("weights sum to zero: nothing to aggregate")
    return x, w


def _check_finite(x: Tensor) -> None:
    if not bool(finite_rows(x).all()):
        raise ValueError("centered_clip got non-finite values (NaN or Inf): such inputs are malformed, not aggregated")


_START_ACCURACY = 1e-3
"""The largest error, relative to a centred squared distance, the start's derived Gram matrix may carry for its solve
to be used (a float32 chunk product errs by ~3e-7 of ``|x_i| |x_j|``; 1e-6 is assumed)."""


def _start(x: Tensor, w: Tensor, tau: float, eps: float, rel_eps: float, budget: int, v: Tensor) -> Optional[int]:
    """Write the start into ``v`` (see the module's docstring) and return the solve's iterations (-1: ``v`` is a row,
    the first pass solves from the mean); ``None`` when the rows' squared norms are outside float32's comfortable range
    (the caller starts from the coordinate median). Raises on non-finite rows."""
    gram = accurate_dots(x, x)
    sq = gram.diagonal()
    if not bool(torch.isfinite(sq).all()):
        _check_finite(x)  # raises, unless float32 squares overflowed
        return None
    top = float(sq.max())
    if not 1e-30 < top < 1e30:
        return None
    n = x.shape[0]
    dist2 = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    k = int(dist2.sqrt().median(dim=1).values.argmin())  # the medoid (lower median over the n distances, self's 0 included)
    centred = gram - gram[:, k : k + 1] - gram[k : k + 1, :] + gram[k, k]  # (x_i - x_k) . (x_j - x_k)
    norms = sq.sqrt()
    error = 1e-6 * (norms[:, None] * norms[None, :] + norms[:, None] * norms[k] + norms[None, :] * norms[k] + sq[k])
    others = torch.arange(n, device=x.device) != k
    accurate = bool((error.diagonal()[others] <= _START_ACCURACY * centred.diagonal()[others]).all())
    if not accurate:
        v.copy_(x[k])
        return -1
    # at most 100 iterations here: the passes certify (and finish) what an inexact derived matrix leaves
    beta, spent = _solve_in_span(centred, w, tau, eps, min(budget, 100), from_mean=True, rel_eps=rel_eps, raw=gram)  # weights over the rows: sum(beta) = 1
    torch.mv(x.T, beta.to(x.dtype), out=v)
    return spent


def _solve_in_span(gram: Tensor, w: Tensor, tau: float, eps: float, budget: int, from_mean: bool = False,
                   rel_eps: float = 0.0, raw: Optional[Tensor] = None) -> tuple[Tensor, int]:
    """Reweighting iterations in the coordinates ``u = sum_j beta_j d_j`` of the centred rows ``d_j``.

    ``gram`` is ``[m, m]`` float64 (``d_i . d_j``). Starts at ``u = 0`` (the centre), or at the weighted mean of the
    rows when the centre is one of them: reweighting from a row converges slowly where the rows' fixed points form a
    segment ending a distance ``tau`` from that row. Stops when a step moves ``u`` by less than ``target / 100`` (the
    full-vector residual, measured by the caller, is what certifies the result), where ``target`` is
    ``max(eps, rel_eps * ||v||)`` and ``||v||`` comes from ``raw``, the Gram matrix of the rows themselves, when the
    iterate is ``v = sum_j beta_j x_j`` (the start; a pass states its target in ``eps``).
    """
    diag = gram.diagonal()
    beta = w / w.sum() if from_mean else torch.zeros_like(w)
    for it in range(1, budget + 1):
        g_beta = gram @ beta
        dist = (diag - 2 * g_beta + beta @ g_beta).clamp_min(0).sqrt()
        wc = w * clip_coefficients(dist, tau)
        new_beta = wc / wc.sum()
        delta = new_beta - beta
        beta = new_beta
        target = max(eps, rel_eps * max(float(beta @ raw @ beta), 0.0) ** 0.5) if raw is not None and rel_eps else eps
        if float(delta @ gram @ delta) <= (target * 1e-2) ** 2:
            return beta, it
    return beta, budget


def _gram(work: Tensor) -> tuple[Tensor, float]:
    """The float64 Gram matrix of the rows ``d_i`` of ``work``, and the unit they are left in.

    Its products are float32 chunks summed in float64 (:func:`accurate_dots`): one float32 product over millions
    of elements errs by ~1e-4 relative, enough to leave the in-span solve short of the fixed point (two far-apart
    rows, whose fixed points form a segment, were 12x short of the residual target and the check failed them).

    Squared distances outside float32's comfortable range (rows closer than ~1e-15 to ``v``, say the
    gradients of a confidently fitted model, or farther than ~1e15) would underflow or overflow in a
    float32 product: then ``work`` is divided by its largest row norm (``unit``) first."""
    gram = accurate_dots(work, work)
    top = float(gram.diagonal().max())
    if 1e-30 < top < 1e30:
        return gram, 1.0
    unit = float(safe_norm(work, dim=1).max())
    if not 0.0 < unit < math.inf:
        return gram, 1.0  # every row is v (nothing to scale), or the inputs are beyond float32 anyway
    work.div_(unit)
    return accurate_dots(work, work) * unit**2, unit


def centered_clip_with_stats(
    x: Tensor,
    tau: float,
    weights: Optional[Tensor] = None,
    *,
    max_iters: int = 500,
    eps: float = 1e-6,
    rel_eps: float = 0.0,
    out: Optional[Tensor] = None,
) -> CenteredClipResult:
    """CenteredClip of the rows of ``x`` (``[n, d]``), with how it was reached. See :func:`centered_clip`.

    ``rel_eps`` adds a target relative to the result's norm: the solver stops at a residual of
    ``max(eps, rel_eps * ||v||)`` (the verification protocol states its bound that way). ``out``
    (``[d]``, the input's dtype) receives the result instead of a new tensor.
    """
    x, w = _validate(x, float(tau), weights)
    tau = float(tau)
    active = w > 0
    if not bool(active.all()):
        x, w = x[active], w[active]
    w_total = w.sum()
    n, d = x.shape

    v = torch.empty(d, dtype=x.dtype, device=x.device) if out is None else out
    if math.isinf(tau) or n == 1:
        _check_finite(x)
        torch.mv(x.T, (w / w_total).to(x.dtype), out=v)  # a gemv: faster on a CPU than a weighted sum
        return CenteredClipResult(value=v, iterations=0, residual=0.0, clipped=0, converged=True)

    work = SCRATCH.view("rows", (n, d), x.dtype, x.device)
    vec = SCRATCH.view("vector", (d,), x.dtype, x.device)
    started = _start(x, w, tau, eps, rel_eps, max_iters, v)
    if started is None:
        _check_finite(x)
        coordinate_median(x, workspace=work, out=v)  # the released code's starting point
    iterations = max(started or 0, 0)
    from_mean = started == -1
    residual = math.inf
    clipped = 0
    for _ in range(_MAX_PASSES):
        torch.sub(x, v, out=work)  # d_i = x_i - v
        gram, unit = _gram(work)  # work now holds d_i / unit
        coef = clip_coefficients(gram.diagonal().clamp_min(0).sqrt(), tau)
        clipped = int((coef < 1).sum())
        r = torch.mv(work.T, ((w * coef) / w_total).to(x.dtype), out=vec)
        residual = float(safe_norm(r)) * unit  # a float32 reduction (~1e-7 relative), float64 only where float32 underflows
        target = max(eps, rel_eps * float(safe_norm(v))) if rel_eps else eps
        if residual <= target or iterations >= max_iters:
            break
        beta, spent = _solve_in_span(gram, w, tau, target, max_iters - iterations, from_mean)
        iterations, from_mean = iterations + spent, False
        v.add_(torch.mv(work.T, (beta * unit).to(x.dtype), out=vec))
    converged = residual <= target
    if not converged:
        warnings.warn(
            f"centered_clip stopped short of the fixed point: residual {residual:.3g} > target {target:.3g} after "
            f"{iterations} iterations (raise max_iters, or eps if the inputs are too large for float32)",
            RuntimeWarning,
            stacklevel=2,
        )
    return CenteredClipResult(value=v, iterations=iterations, residual=residual, clipped=clipped, converged=converged)


def centered_clip(
    x: Tensor,
    tau: float,
    weights: Optional[Tensor] = None,
    *,
    max_iters: int = 500,
    eps: float = 1e-6,
) -> Tensor:
    """Robust aggregate of the rows of ``x``: the fixed point of CenteredClip with radius ``tau``.

    Args:
        x: ``[n, d]`` rows to aggregate.
        tau: clipping radius; ``float("inf")`` gives the (weighted) mean.
        weights: ``[n]`` non-negative weights (default: all ones); rows of weight 0 are ignored.
        max_iters: cap on reweighting iterations; a result that stopped short warns.
        eps: target residual ``||sum_i w_i c_i (x_i - v)|| / sum_i w_i``.

    Returns:
        ``[d]`` aggregate. Raises ``ValueError`` on non-finite inputs, bad shapes or bad weights.
    """
    return centered_clip_with_stats(x, tau, weights, max_iters=max_iters, eps=eps).value
