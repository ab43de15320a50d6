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
   solve's combination of the rows; otherwise it is the medoid itself.
2. Each pass reads the rows once, in column chunks that stay in the core's cache: it writes ``v``
   (the start's combination, or the previous pass's move), centres the chunk on it (``d_i = x_i -
   v``), and takes all products of the ``d_i`` and of ``r' = sum_i g_i d_i``, where ``g`` are the
   coefficients the last solve predicts at ``v`` (the Gram matrix from 1024-element pieces,
   the products with ``r'`` per chunk, all summed in float64). The Gram matrix gives the true coefficients
   ``a``, and ``|sum_i a_i d_i|^2 = |r'|^2 + 2 (a - g) . (d r') + (a - g)^T G (a - g)`` the
   residual, stated as an upper bound with every product's rounding error added (small when the
   prediction was good, which is when the residual is small). Its float32 rounding is relative to
   the distances from ``v``, so a pass at the fixed point certifies it. Above the target, the pass
   solves in the span of the ``d_i`` and the next pass moves ``v`` as it reads.

3. Uncertified (``certify=False``, the unverified rounds: nobody checks their aggregates): where the start's derived
   matrix is accurate and its solve converged, the start's combination of the rows is the result, written by one
   ``gemv``, without the pass of 2. Its residual is the derived matrix's estimate, not a bound.

Measured on one thread (``./run bench centered_clip`` uses two): about 9 reads of the input at ``[4, 2.8M]`` and 12
at ``[16, 700k]`` (the start's Gram matrix 1.2 and 3 of them), against 13 and 14 when each pass wrote the centred
rows out in full; on two threads 12 and 16, as a cached chunk's arithmetic does not spread across threads. The
released code's start, the coordinate-wise median, alone cost 25; it is kept for rows beyond float32's comfortable
range.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_btard.ops.accurate_sums import accurate_dots
from lightning_btard.ops.finite import all_finite, finite_rows
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
    """An upper bound on ``||sum_i w_i c_i (x_i - v)|| / sum_i w_i`` at the returned ``v``, from products over the full
    vectors (``inf`` when none was measured)."""
    clipped: int
    """How many rows (with a positive weight) lie farther than ``tau`` from ``v``."""
    converged: bool
    """Whether ``residual <= eps`` was reached within ``max_iters``."""
    certified: bool = True
    """Whether ``residual`` is the bound measured on the full vectors; ``False`` for a result taken uncertified
    (``certify=False``): then ``residual`` is the start's estimate from its derived Gram matrix."""


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

_PRODUCT_ERROR = 6.2e-5
"""A bound on the relative error of one of the pass's products ``a . b`` (float32 over 1024 elements, the chunks summed
in float64): ``1024 * 2**-24`` of ``sum |a_k b_k| <= |a| |b|``, whatever order the additions take and whatever the
rows are. The residual the pass states is an upper bound built with it."""

_CHUNKED_RESIDUAL = True
"""On a CPU, the products with the pass's ``r'`` are taken per chunk (tests turn it off to run the per-piece products
a GPU uses)."""

_CHUNK_BYTES = 1 << 20
"""The pass works on column chunks of the rows this large (the centred rows and their residual, on a CPU), which stay in
the core's cache between the few operations on them; on a GPU, one chunk of the whole rows."""


@dataclass
class _Start:
    """Where the passes start: ``v = sum_j beta_j x_j`` (``beta``, not yet written into ``v``; ``guess``, the
    coefficients the start's solve predicts at it) or, with ``beta`` ``None``, ``v`` as written; ``iterations`` spent;
    ``from_mean``: the first solve in the span starts from the mean (``v`` is a row, or the median)."""

    beta: Optional[Tensor]
    guess: Optional[Tensor]
    iterations: int
    from_mean: bool
    centred: Optional[Tensor] = None
    """The Gram matrix of the rows centred on the medoid, derived from the rows' own (with ``beta``)."""
    converged: bool = False
    """Whether the start's solve stopped by its rule rather than at its iteration cap."""


def _start(x: Tensor, w: Tensor, tau: float, eps: float, rel_eps: float, budget: int, v: Tensor) -> _Start:
    """The start (see the module's docstring): the solve's combination of the rows, or the medoid written into ``v``
    when the derived matrix is inexact, or the coordinate median when the rows' squared norms are outside float32's
    comfortable range. Raises on non-finite rows."""
    gram = accurate_dots(x, x)
    sq = gram.diagonal()
    if not bool(torch.isfinite(sq).all()):
        _check_finite(x)  # raises, unless float32 squares overflowed
    top = float(sq.max())
    if not 1e-30 < top < 1e30:
        _check_finite(x)
        coordinate_median(x, workspace=SCRATCH.view("rows", tuple(x.shape), x.dtype, x.device), out=v)  # the released start
        return _Start(None, None, 0, True)
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
        return _Start(None, None, 0, True)
    # at most 100 iterations here: the passes certify (and finish) what an inexact derived matrix leaves
    cap = min(budget, 100)
    beta, spent = _solve_in_span(centred, w, tau, eps, cap, from_mean=True, rel_eps=rel_eps, raw=gram)  # weights over the rows: sum(beta) = 1
    return _Start(beta, _coefficients(centred, beta, w, tau), spent, False, centred, converged=spent < cap)


def _distances(gram: Tensor, beta: Tensor) -> Tensor:
    """``|d_i - u|`` at ``u = sum_j beta_j d_j``, for rows ``d_i`` of Gram matrix ``gram``."""
    g_beta = gram @ beta
    return (gram.diagonal() - 2 * g_beta + beta @ g_beta).clamp_min(0).sqrt()


def _coefficients(gram: Tensor, beta: Tensor, w: Tensor, tau: float) -> Tensor:
    """``w_i * min(1, tau / |d_i - u|)`` at ``u = sum_j beta_j d_j``."""
    return w * clip_coefficients(_distances(gram, beta), tau)


def _objective(gram: Tensor, beta: Tensor, w: Tensor, tau: float) -> float:
    """The Huber objective ``sum_i w_i huber_tau(|d_i - u|)`` that CenteredClip's fixed point minimises."""
    dist = _distances(gram, beta)
    return float(w @ torch.where(dist <= tau, dist.square() / 2, tau * dist - tau**2 / 2))


def _solve_in_span(gram: Tensor, w: Tensor, tau: float, eps: float, budget: int, from_mean: bool = False,
                   rel_eps: float = 0.0, raw: Optional[Tensor] = None) -> tuple[Tensor, int]:
    """Reweighting iterations in the coordinates ``u = sum_j beta_j d_j`` of the centred rows ``d_j``.

    ``gram`` is ``[m, m]`` float64 (``d_i . d_j``). Starts at ``u = 0`` (the centre), or at the weighted mean of the
    rows when the centre is one of them: reweighting from a row converges slowly where the rows' fixed points form a
    segment ending a distance ``tau`` from that row. Stops when a step moves ``u`` by less than ``target / 100`` (the
    full-vector residual, measured by the caller, is what certifies the result), where ``target`` is
    ``max(eps, rel_eps * ||v||)`` and ``||v||`` comes from ``raw``, the Gram matrix of the rows themselves, when the
    iterate is ``v = sum_j beta_j x_j`` (the start; a pass states its target in ``eps``).

    Each reweighting step is stretched (over-relaxed) by a factor that doubles while the stretched point lowers the
    Huber objective below the plain step's, and falls back to the plain step when it does not: plain steps crawl where
    the fixed point sits near a row (all rows clipped, a hostile row far away: the geometric median case), which let
    a sender's choice of row keep an honest aggregator short of the residual the check demands. The objective only
    decreases, so the fixed point is the same.
    """
    beta = w / w.sum() if from_mean else torch.zeros_like(w)
    stretch = 1.0
    for it in range(1, budget + 1):
        wc = _coefficients(gram, beta, w, tau)
        plain = wc / wc.sum()
        delta = plain - beta
        new_beta = plain
        if it > 1:  # (the first step from u = 0 fixes the scale: every later beta sums to 1)
            stretched = beta + 2 * stretch * delta
            if _objective(gram, stretched, w, tau) < _objective(gram, plain, w, tau):
                new_beta, stretch = stretched, min(2 * stretch, 2.0**20)
            else:
                stretch = 1.0
        beta = new_beta
        target = max(eps, rel_eps * max(float(beta @ raw @ beta), 0.0) ** 0.5) if raw is not None and rel_eps else eps
        if float(delta @ gram @ delta) <= (target * 1e-2) ** 2:
            return beta, it
    return beta, budget


@dataclass
class _Pass:
    """What one pass measured at its ``v``: the Gram matrix of ``d_i = x_i - v`` (float64, original units), and for
    the residual ``r' = sum_i guess_i d_i`` of the guessed coefficients, the products ``d_i . r'`` and ``|r'|^2``, with
    ``floor``, what float32 underflow may have dropped from ``|r'|^2`` (squares below ``FLT_MIN``)."""

    gram: Tensor
    guess: Tensor
    guess_dots: Tensor
    guess_square: float
    floor: float
    chunk_error: float
    """A bound on the relative error of ``d_i . r'`` and ``|r'|^2`` (float32 over a chunk, the chunks summed in
    float64)."""


def _pass(x: Tensor, v: Tensor, guess: Tensor, start: Optional[Tensor], move: Optional[Tensor], unit: float) -> _Pass:
    """One read of the rows, chunk by chunk: first ``v = start @ x`` or ``v += move @ (x - v)`` (the previous pass's
    solve), then the centred rows ``d = (x - v) / unit`` and ``r' = guess @ d`` in a cached buffer; the Gram matrix of
    the ``d_i`` from 1024-element pieces, ``d_i . r'`` and ``|r'|^2`` per chunk (all summed in float64)."""
    n, d = x.shape
    chunked = x.device.type == "cpu"
    columns = max(1024, _CHUNK_BYTES * torch.get_num_threads() // (x.element_size() * (n + 1)) // 1024 * 1024) if chunked else d
    columns = min(columns, d)
    buf = SCRATCH.view("rows", (n + 1, columns), x.dtype, x.device)
    pieces = torch.empty(d // 1024, n, n, dtype=x.dtype, device=x.device)
    # the products with r': per chunk on a CPU (one gemv each, their error bounded by the chunk's length), per
    # 1024-element piece where the chunk is the whole row (a GPU: one batched product, and a tight bound at any length)
    by_piece = not chunked or not _CHUNKED_RESIDUAL
    residual_products = torch.empty(d // 1024 if by_piece else -(-d // columns), n + 1, dtype=x.dtype, device=x.device)
    tail = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    tail_products = torch.zeros(n + 1, dtype=torch.float64, device=x.device)
    guess_row = guess.to(x.dtype)[None]
    start_row = start.to(x.dtype)[None] if start is not None else None
    move_row = move.to(x.dtype)[None] if move is not None else None
    for c, s in enumerate(range(0, d, columns)):
        e = min(d, s + columns)
        xc, vc, b = x[:, s:e], v[s:e], buf[:, : e - s]
        rows, r = b[:n], b[n]
        if start_row is not None:
            torch.mm(start_row, xc, out=vc[None])
        torch.sub(xc, vc, out=rows)
        if move_row is not None:
            step = torch.mm(move_row, rows)
            vc.add_(step[0])
            rows.sub_(step)
        if unit != 1.0:
            rows.div_(unit)
        torch.mm(guess_row, rows, out=b[n:])
        if not by_piece:
            torch.mv(b, r, out=residual_products[c])
        m = (e - s) // 1024
        if m:
            at = slice(s // 1024, s // 1024 + m)
            whole = b[:, : m * 1024].view(n + 1, m, 1024).transpose(0, 1)
            torch.bmm(whole[:, :n], whole[:, :n].transpose(1, 2), out=pieces[at])
            if by_piece:
                torch.bmm(whole, whole[:, n:].transpose(1, 2), out=residual_products[at, :, None])
        if m * 1024 < e - s:
            rest = b[:, m * 1024 :].double()
            tail += rest[:n] @ rest[:n].T
            if by_piece:
                tail_products += rest @ rest[n]
    gram = (pieces.sum(0, dtype=torch.float64) + tail) * unit**2
    products = (residual_products.sum(0, dtype=torch.float64) + tail_products) * unit**2
    return _Pass(gram=gram, guess=guess, guess_dots=products[:n], guess_square=float(products[n]),
                 floor=d * torch.finfo(x.dtype).tiny * unit**2,
                 chunk_error=_PRODUCT_ERROR if by_piece else 1.01 * columns * 2.0**-24)


def _measure(x: Tensor, v: Tensor, guess: Tensor, start: Optional[Tensor], move: Optional[Tensor]) -> _Pass:
    """:func:`_pass`, repeated on rows divided by their largest distance from ``v`` when the squared distances are
    outside float32's comfortable range (rows closer than ~1e-15 to ``v``, say the gradients of a confidently fitted
    model, or farther than ~1e15), where the float32 products would underflow or overflow."""
    measured = _pass(x, v, guess, start, move, 1.0)
    top = float(measured.gram.diagonal().max())
    if 1e-30 < top < 1e30:
        return measured
    if not 0.0 < top < math.inf:  # every row is v (nothing to scale), or overflowed: the rows' own norms
        work = torch.sub(x, v, out=SCRATCH.view("rows", tuple(x.shape), x.dtype, x.device))
        top = float(safe_norm(work, dim=1).max()) ** 2
        if not 0.0 < top < math.inf:
            return measured
    return _pass(x, v, guess, None, None, top**0.5)


def _residual(measured: _Pass, coef: Tensor, floor: bool = True) -> float:
    """An upper bound on ``|sum_i coef_i d_i|`` from the measured ``r' = sum_i guess_i d_i``: with ``delta = coef -
    guess``, ``|r|^2 = |r'|^2 + 2 delta . (d r') + delta^T G delta``. Each product may err by :data:`_PRODUCT_ERROR`
    of its factors' norms, and ``|r'|^2`` may have lost ``floor`` to underflow: both are added. The bound is tight when
    the guess is close (then ``delta`` is small) and the result is near the fixed point (then ``r'`` is)."""
    delta = coef - measured.guess
    norms = measured.gram.diagonal().clamp_min(0).sqrt()
    spread = float(delta.abs() @ norms)
    rho = max(measured.guess_square, 0.0) ** 0.5
    square = measured.guess_square + 2 * float(delta @ measured.guess_dots) + float(delta @ measured.gram @ delta)
    slack = measured.chunk_error * (rho**2 + 2 * rho * spread) + _PRODUCT_ERROR * spread**2 + (measured.floor if floor else 0.0)
    return max(square, 0.0) ** 0.5 + slack**0.5 if math.isfinite(square) else math.inf


def _direct_residual(x: Tensor, v: Tensor, coef: Tensor) -> float:
    """``|sum_i coef_i (x_i - v)|`` itself, its norm exact at any scale (:func:`safe_norm`): for when the underflow
    floor of the pass's ``|r'|^2`` is all that keeps its bound above the target (rows at very different distances,
    where the pass's scaling to the farthest leaves the others' residual below float32's smallest squares)."""
    work = torch.sub(x, v, out=SCRATCH.view("rows", tuple(x.shape), x.dtype, x.device))
    return float(safe_norm(torch.mv(work.T, coef.to(x.dtype))))


def _uncertified(x: Tensor, w: Tensor, tau: float, beta: Tensor, centred: Tensor, iterations: int, v: Tensor) -> CenteredClipResult:
    """``v = sum_j beta_j x_j`` (one ``gemv``), with the residual and the clipped rows as the derived Gram matrix of
    the rows centred on the medoid gives them: at ``u = sum_j beta_j d_j``, ``x_i - v = d_i - u``, so the residual
    ``sum_i a_i (d_i - u) = sum_j (a_j - beta_j sum_i a_i) d_j``."""
    torch.mv(x.T, beta.to(x.dtype), out=v)
    coef = clip_coefficients(_distances(centred, beta), tau)
    a = w * coef / w.sum()
    c = a - beta * a.sum()
    residual = max(float(c @ centred @ c), 0.0) ** 0.5
    clipped = int((coef < 1).sum())
    return CenteredClipResult(value=v, iterations=iterations, residual=residual, clipped=clipped, converged=True,
                              certified=False)


def centered_clip_with_stats(
    x: Tensor,
    tau: float,
    weights: Optional[Tensor] = None,
    *,
    max_iters: int = 500,
    eps: float = 1e-6,
    rel_eps: float = 0.0,
    out: Optional[Tensor] = None,
    certify: bool = True,
) -> CenteredClipResult:
    """CenteredClip of the rows of ``x`` (``[n, d]``), with how it was reached. See :func:`centered_clip`.

    ``rel_eps`` adds a target relative to the result's norm: the solver stops at a residual of
    ``max(eps, rel_eps * ||v||)`` (the verification protocol states its bound that way). ``out``
    (``[d]``, the input's dtype) receives the result instead of a new tensor.

    ``certify=False`` (for rounds nobody checks) takes the start's solve as the result when its derived Gram matrix
    is accurate and the solve converged: one read of the rows for the Gram matrix and one to write ``v``, without the
    pass that measures the residual on the full vectors (about 6 reads). The result is the fixed point of the rows'
    Gram matrix as float32 products summed in float64 give it; ``residual`` is then that matrix's estimate
    (``certified`` is ``False``). Otherwise, and always with ``certify=True``, the passes certify the residual.
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
        torch.mv(x.T, (w / w_total).to(x.dtype), out=v)  # a gemv: faster on a CPU than a weighted sum
        if not all_finite(v):  # a NaN or Inf in a row shows in the mean (times 0 too): the rows are read only then
            _check_finite(x)
        return CenteredClipResult(value=v, iterations=0, residual=0.0, clipped=0, converged=True)

    started = _start(x, w, tau, eps, rel_eps, max_iters, v)
    if not certify and started.beta is not None and started.centred is not None and started.converged:
        return _uncertified(x, w, tau, started.beta, started.centred, started.iterations, v)
    iterations, from_mean = started.iterations, started.from_mean
    start, move = started.beta, None
    guess = (started.guess if started.guess is not None else w) / w_total
    residual = math.inf
    clipped = 0
    for attempt in range(_MAX_PASSES):
        measured = _measure(x, v, guess, start, move)
        start = move = None
        coef = clip_coefficients(measured.gram.diagonal().clamp_min(0).sqrt(), tau)
        clipped = int((coef < 1).sum())
        a = w * coef / w_total
        residual = _residual(measured, a)
        target = max(eps, rel_eps * float(safe_norm(v))) if rel_eps else eps
        if residual > target >= _residual(measured, a, floor=False):
            residual = _direct_residual(x, v, a)
        if residual <= target or iterations >= max_iters or attempt == _MAX_PASSES - 1:
            break
        move, spent = _solve_in_span(measured.gram, w, tau, target, max_iters - iterations, from_mean)
        iterations, from_mean = iterations + spent, False
        guess = _coefficients(measured.gram, move, w, tau) / w_total
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
