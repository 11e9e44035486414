"""Entropic optimal transport (Sinkhorn), batched over pairs.

`sinkhorn` is the convergent solver: log-stabilised scaling with absorption (Schmitzer 2016, "Stabilized sparse
scaling algorithms for entropy regularized transport problems"). The iterations are plain Sinkhorn scalings
v = b / (K~^T u), u = a / (K~ v) on an absorbed kernel K~ = exp((f_i + g_j - C_ij) / eps); whenever a scaling
leaves a safe range it is absorbed into the dual potentials f, g and K~ is rebuilt. When exp(-C/eps) would
underflow (small eps) the solver starts, and after any underflow continues, with one exact log-domain
(log-sum-exp) iteration, after which every row of K~ is well defined. Otherwise it starts from f = g = 0, so its
iterates are exactly POT's `sinkhorn_knopp` ones. For small eps an epsilon ladder warms up the duals (see
`sinkhorn`). Every pair runs on its own (its own ladder, its own stop), so its result does not depend on the batch.

The scaling iterations between two absorptions have two implementations: `scale_reference` (batched PyTorch,
any device) and the C++/OpenMP extension `kernels/csrc/sinkhorn_cpu.cpp` (CPU: one pass over K~ per iteration
instead of two matrix-vector products, pairs in parallel), used for CPU tensors when it builds.

`sinkhorn_official` is DiscoBox's `SemanticCorrSolver.perform_sinkhorn` as written: 100 plain iterations, no
stabilisation, no stopping test.

Neither function is differentiable (they run under `torch.no_grad()`); the teacher uses them without gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels import extension


@dataclass(frozen=True)
class SinkhornResult:
    """plan (B,n,m) transport plans; iters (B,) int64 iterations each pair ran; err (B,) the achieved marginal
    violation ||T 1 - a||_1 + ||T^T 1 - b||_1 of each plan (<= tol for converged pairs)."""

    plan: torch.Tensor
    iters: torch.Tensor
    err: torch.Tensor


def _check_problem(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    if not isinstance(cost, torch.Tensor) or cost.dim() != 3:
        raise ValueError(f"{where}: cost must be a (B,n,m) tensor, got shape {getattr(cost, 'shape', None)}")
    B, n, m = cost.shape
    if not isinstance(a, torch.Tensor) or tuple(a.shape) != (B, n):
        raise ValueError(f"{where}: a must have shape ({B}, {n}), got {getattr(a, 'shape', None)}")
    if not isinstance(b, torch.Tensor) or tuple(b.shape) != (B, m):
        raise ValueError(f"{where}: b must have shape ({B}, {m}), got {getattr(b, 'shape', None)}")
    if cost.dtype not in (torch.float32, torch.float64) or a.dtype != cost.dtype or b.dtype != cost.dtype:
        raise ValueError(
            f"{where}: cost, a and b must share a float32/float64 dtype, got {cost.dtype}, {a.dtype}, {b.dtype}"
        )
    if a.device != cost.device or b.device != cost.device:
        raise ValueError(f"{where}: cost, a and b must be on one device, got {cost.device}, {a.device}, {b.device}")


def _marginal_violation(
    u: torch.Tensor, k_v: torch.Tensor, a: torch.Tensor, v: torch.Tensor, kt_u: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """||T 1 - a||_1 + ||T^T 1 - b||_1 for T = diag(u) K~ diag(v), from the products k_v = K~ v (B,n) and
    kt_u = K~^T u (B,m) that the iteration computes anyway; (B,)."""
    return (u * k_v - a).abs().sum(-1) + (v * kt_u - b).abs().sum(-1)


STAGE_TOL = 1e-3  # warm-up levels stop at this marginal violation relative to the mass
STAGE_START = 0.1  # the epsilon ladder starts at or below this fraction of the cost range
BACKENDS = ("auto", "reference", "cpu")

# Outcomes of a run of scaling iterations on one pair (`scale_reference` and the C++ `sinkhorn_scale`).
CONVERGED = 0  # violation <= tol
CAPPED = 1  # out of iterations
ABSORB = 2  # the new scalings left the safe range but are finite and positive: returned (iteration counted)
UNDERFLOW = 3  # a new scaling is 0, inf or NaN: the last safe ones are returned (iteration not counted)


def ladder_levels(cost_range: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per pair, how many times epsilon can double and stay below STAGE_START * its cost range: the epsilon
    ladder is epsilon * 2^L, ..., 2 epsilon, epsilon. cost_range (B,) -> (B,) int64 (0 = no warm-up)."""
    levels = torch.zeros(cost_range.shape, dtype=torch.int64, device=cost_range.device)
    start = STAGE_START * cost_range.double()
    while True:
        more = 2 * epsilon * 2.0 ** levels.double() < start
        if not bool(more.any()):
            return levels
        levels += more


def scale_reference(
    kern: torch.Tensor, a: torch.Tensor, b: torch.Tensor, tol: torch.Tensor, max_iters: torch.Tensor, log_tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain Sinkhorn scalings from u = v = 1 on each pair's kernel until it converges, runs out of iterations or
    leaves the safe range |log u|, |log v| < log_tau (outcomes: CONVERGED, CAPPED, ABSORB, UNDERFLOW).

    kern (B,n,m) > 0, a (B,n), b (B,m), tol (B,) of one dtype; max_iters (B,) int64.
    Returns u (B,n), v (B,m), iters (B,) int64, viol (B,) (the violation at CONVERGED / CAPPED), status (B,) int64.
    Batched PyTorch on any device; the C++ extension computes the same per pair in one pass over K per iteration.
    """
    B = kern.shape[0]
    u = kern.new_ones(a.shape)
    v = kern.new_ones(b.shape)
    k_v = kern.sum(-1)
    kt_u = kern.sum(1)
    iters = torch.zeros(B, dtype=torch.int64, device=kern.device)
    viol = kern.new_zeros(B)
    status = torch.full((B,), -1, dtype=torch.int64, device=kern.device)
    live = torch.ones(B, dtype=torch.bool, device=kern.device)
    while True:
        current = _marginal_violation(u, k_v, a, v, kt_u, b)
        viol = torch.where(live, current, viol)
        converged = live & (current <= tol)
        capped = live & ~converged & (iters >= max_iters)
        status[converged] = CONVERGED
        status[capped] = CAPPED
        live = live & ~converged & ~capped
        if not bool(live.any()):
            break
        v_new = b / kt_u
        k_v_new = torch.bmm(kern, v_new[:, :, None])[:, :, 0]
        u_new = a / k_v_new
        log_u, log_v = u_new.log(), v_new.log()
        finite = torch.isfinite(log_u).all(1) & torch.isfinite(log_v).all(1)
        ok = finite & (log_u.abs().amax(1) < log_tau) & (log_v.abs().amax(1) < log_tau)
        step = live & finite
        u = torch.where(step[:, None], u_new, u)
        v = torch.where(step[:, None], v_new, v)
        k_v = torch.where(step[:, None], k_v_new, k_v)
        iters = iters + step
        status[live & finite & ~ok] = ABSORB
        status[live & ~finite] = UNDERFLOW
        live = live & ok
        if not bool(live.any()):
            break
        kt_u = torch.bmm(u[:, None, :], kern)[:, 0, :]
    return u, v, iters, viol, status


def _cpu_module(t: torch.Tensor, backend: str):
    """The C++ extension when it applies (CPU tensor, backend auto/cpu) and builds, else None."""
    if t.device.type == "cpu" and backend in ("auto", "cpu"):
        return extension.load_sinkhorn_cpu()
    return None


def absorbed_kernel(cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    """K~ = exp((f_i + g_j - C_ij) / eps): cost (B,n,m), f (B,n), g (B,m) -> (B,n,m)."""
    module = _cpu_module(cost, backend)
    if module is not None:
        return module.sinkhorn_kernel(cost.contiguous(), f.contiguous(), g.contiguous(), eps, torch.get_num_threads())
    return torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps)


def _scale(kern, a, b, tol, max_iters, log_tau, backend):
    """`scale_reference`, or the C++ extension's loop where it applies."""
    module = _cpu_module(kern, backend)
    if module is not None:
        return tuple(module.sinkhorn_scale(kern.contiguous(), a.contiguous(), b.contiguous(), tol.contiguous(),
                                           max_iters.contiguous(), log_tau, torch.get_num_threads()))
    return scale_reference(kern, a, b, tol, max_iters, log_tau)


@torch.no_grad()
def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: float,
    tol: float = 1e-6,
    max_iter: int = 1000,
    eps_scaling: bool = True,
    backend: str = "auto",
) -> SinkhornResult:
    """Entropic OT plans min <T, C> - eps H(T) s.t. T 1 = a, T^T 1 = b, for a batch of problems.

    cost (B,n,m), a (B,n), b (B,m) float32/float64 on one device; a and b strictly positive with equal mass per
    pair (any positive values, not only probability vectors). Iterates until the marginal violation
    ||T 1 - a||_1 + ||T^T 1 - b||_1 is <= tol, or max_iter iterations. The violation cannot fall below the pairs'
    mass mismatch |sum a - sum b| (e.g. ~1e-8 for float32-normalised marginals), so pick tol above it.
    With `eps_scaling` and an epsilon below a tenth of the cost range, the duals are first warmed up on a ladder
    of halving epsilons (each solved to a loose tolerance); plain Sinkhorn needs O(range/epsilon) more iterations
    there. Otherwise (and with eps_scaling=False) the iterates are exactly those of plain Sinkhorn (POT's
    `sinkhorn_knopp`). Iterations of all ladder stages count towards max_iter and `iters`; the last one always
    runs at the final epsilon. Every pair runs on its own (its ladder comes from its own cost range): its result
    does not depend on the rest of the batch.
    backend: "auto" and "cpu" run the scaling iterations in the C++ extension for CPU tensors (the PyTorch loop
    when it cannot be built); "reference" always runs the PyTorch loop.
    Returns SinkhornResult(plan (B,n,m), iters (B,) iterations run, err (B,) the violation at the stop).
    """
    _check_problem(cost, a, b, "sinkhorn")
    B, n, m = cost.shape
    if n == 0 or m == 0:
        raise ValueError(f"sinkhorn: both sides need at least one point, got cost shape {tuple(cost.shape)}")
    if not (isinstance(epsilon, (int, float)) and epsilon > 0):
        raise ValueError(f"sinkhorn: epsilon must be a positive number, got {epsilon!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"sinkhorn: tol must be a non-negative number, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"sinkhorn: max_iter must be a positive int, got {max_iter!r}")
    if backend not in BACKENDS:
        raise ValueError(f"sinkhorn: backend must be one of {BACKENDS}, got {backend!r}")
    if B == 0:
        no_iters = torch.zeros(0, dtype=torch.int64, device=cost.device)
        return SinkhornResult(plan=cost.new_empty(0, n, m), iters=no_iters, err=cost.new_empty(0))
    # The range, the size and the finiteness of the cost (min and max propagate NaN).
    lo, hi = cost.amin((1, 2)), cost.amax((1, 2))
    if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
        raise ValueError("sinkhorn: cost contains NaN or inf")
    if not bool((a > 0).all() and (b > 0).all() and torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("sinkhorn: marginals a and b must be finite and strictly positive")
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    if not bool(torch.allclose(mass_a, mass_b, rtol=1e-4, atol=0.0)):
        worst = int(((mass_a - mass_b).abs() / mass_a).argmax())
        raise ValueError(
            f"sinkhorn: a and b must carry equal mass per pair; pair {worst} has "
            f"{float(mass_a[worst]):.6g} vs {float(mass_b[worst]):.6g}"
        )

    # Each pair's epsilon ladder: level L runs at epsilon * 2^L; level 0 is the final epsilon.
    level = ladder_levels(hi - lo, float(epsilon)) if eps_scaling else torch.zeros_like(hi, dtype=torch.int64)
    # A scaling beyond this magnitude is absorbed into the duals before u * K~ * v can overflow or underflow.
    log_tau = 0.25 * math.log(torch.finfo(cost.dtype).max)
    # Warm-up levels only need to bring the duals near the next level's solution.
    warm_tol = (STAGE_TOL * mass_a).clamp(min=tol)
    final_tol = torch.full_like(mass_a, tol)
    log_a, log_b = a.log(), b.log()

    plan = cost.new_empty(B, n, m)
    iters = torch.zeros(B, dtype=torch.int64, device=cost.device)
    err = cost.new_empty(B)
    f = cost.new_zeros(B, n)
    g = cost.new_zeros(B, m)
    # Plain start (f = g = 0, POT's iterates) while exp(-C/eps) is safely representable; else the log domain.
    need_lse = torch.maximum(lo.abs(), hi.abs()) / (epsilon * 2.0 ** level.to(cost.dtype)) >= 2 * log_tau
    pending = torch.ones(B, dtype=torch.bool, device=cost.device)

    while bool(pending.any()):
        # The pending pairs at one level advance together (usually the whole batch).
        lv = int(level[pending].max())
        sel = pending & (level == lv)
        whole = bool(sel.all())
        idx = torch.arange(B, device=cost.device) if whole else torch.nonzero(sel)[:, 0]
        C = cost if whole else cost[idx]
        eps = float(epsilon) * 2.0**lv
        fs, gs = f[idx], g[idx]
        lse = need_lse[idx]
        if bool(lse.any()):
            # One exact log-domain iteration: afterwards K~ has entries <= 1 and rows summing to a.
            g_l = eps * (log_b[idx] - torch.logsumexp((fs[:, :, None] - C) / eps, dim=1))
            f_l = eps * (log_a[idx] - torch.logsumexp((g_l[:, None, :] - C) / eps, dim=2))
            fs = torch.where(lse[:, None], f_l, fs)
            gs = torch.where(lse[:, None], g_l, gs)
            iters[idx] += lse
            need_lse[idx] = False
        kern = absorbed_kernel(C, fs, gs, eps, backend)
        # A warm-up level keeps the last iteration for the final epsilon.
        budget = (max_iter - iters[idx] - (1 if lv > 0 else 0)).clamp(min=0)
        stage_tol = (warm_tol if lv > 0 else final_tol)[idx]
        u, v, it, viol, status = _scale(kern, a[idx], b[idx], stage_tol, budget, log_tau, backend)
        iters[idx] += it
        stop = (status == CONVERGED) | (status == CAPPED)
        if lv == 0:
            if whole and bool(stop.all()):
                plan = kern.mul_(u[:, :, None]).mul_(v[:, None, :])
            else:
                plan[idx[stop]] = u[stop, :, None] * kern[stop] * v[stop, None, :]
            err[idx[stop]] = viol[stop]
            pending[idx[stop]] = False
        else:
            level[idx[status == CONVERGED]] = lv - 1
            level[idx[status == CAPPED]] = 0
        # Absorb the scalings into the duals (after an underflow, the last safe ones; then a log-domain step).
        f[idx] = fs + eps * u.log()
        g[idx] = gs + eps * v.log()
        need_lse[idx[status == UNDERFLOW]] = True
    return SinkhornResult(plan=plan, iters=iters, err=err)


@torch.no_grad()
def sinkhorn_official(
    cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float = 0.05, iters: int = 100
) -> torch.Tensor:
    """DiscoBox `perform_sinkhorn`: u, v start at 1/dim; `iters` times v = b / (K^T u), u = 1 / ((K / a) v);
    T = diag(u) K diag(v) with K = exp(-cost / reg). No stabilisation and no stopping test (the reference's
    error is never updated), so small `reg` can give NaN exactly as the reference does.

    cost (B,n,m), a (B,n), b (B,m) of one float dtype -> plan (B,n,m) in that dtype.
    """
    _check_problem(cost, a, b, "sinkhorn_official")
    if not (isinstance(reg, (int, float)) and reg > 0):
        raise ValueError(f"sinkhorn_official: reg must be a positive number, got {reg!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"sinkhorn_official: iters must be a non-negative int, got {iters!r}")
    B, n, m = cost.shape
    u = cost.new_ones(B, n) / n
    v = cost.new_ones(B, m) / m
    K = torch.exp(-cost / reg)
    Kp = (1 / a)[:, :, None] * K
    for _ in range(iters):
        v = b / (K * u[:, :, None]).sum(dim=1)
        u = 1.0 / (Kp * v[:, None, :]).sum(dim=2)
    return u[:, :, None] * K * v[:, None, :]
