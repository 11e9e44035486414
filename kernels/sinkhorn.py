"""Entropic optimal transport (Sinkhorn), batched over pairs.

`sinkhorn` is the convergent solver: log-stabilised scaling with absorption (Schmitzer 2016, "Stabilized sparse
scaling algorithms for entropy regularized transport problems"). The iterations are plain Sinkhorn scalings
v = b / (K~^T u), u = a / (K~ v) with batched matrix-vector products on an absorbed kernel
K~ = exp((f_i + g_j - C_ij) / eps); whenever a scaling leaves a safe range it is absorbed into the dual potentials
f, g and K~ is rebuilt. When exp(-C/eps) would underflow (small eps) the solver starts, and after any underflow
continues, with one exact log-domain (log-sum-exp) iteration, after which every row of K~ is well defined.
Otherwise it starts from f = g = 0, so its iterates are exactly POT's `sinkhorn_knopp` ones. For small eps an
epsilon ladder warms up the duals (see `sinkhorn`). Converged pairs stop iterating, so each pair gets exactly the
iterations it needs.

`sinkhorn_official` is DiscoBox's `SemanticCorrSolver.perform_sinkhorn` as written: 100 plain iterations, no
stabilisation, no stopping test.

Neither function is differentiable (they run under `torch.no_grad()`); the teacher uses them without gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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


STAGE_TOL = 1e-3  # warm-up stages stop at this marginal violation relative to the mass
STAGE_START = 0.1  # the epsilon ladder starts at or below this fraction of the cost range


def epsilon_schedule(cost: torch.Tensor, epsilon: float) -> list[float]:
    """Decreasing epsilons ending at `epsilon`, halving from at most STAGE_START * (cost range); [epsilon] when
    epsilon is already that large. cost (B,n,m) -> list of floats."""
    start = STAGE_START * float(cost.amax() - cost.amin())
    ladder = [epsilon]
    while 2 * ladder[-1] < start:
        ladder.append(2 * ladder[-1])
    return ladder[::-1]


@torch.no_grad()
def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: float,
    tol: float = 1e-6,
    max_iter: int = 1000,
    eps_scaling: bool = True,
) -> SinkhornResult:
    """Entropic OT plans min <T, C> - eps H(T) s.t. T 1 = a, T^T 1 = b, for a batch of problems.

    cost (B,n,m), a (B,n), b (B,m) float32/float64 on one device; a and b strictly positive with equal mass per
    pair (any positive values, not only probability vectors). Iterates until the marginal violation
    ||T 1 - a||_1 + ||T^T 1 - b||_1 is <= tol, or max_iter iterations. The violation cannot fall below the pairs'
    mass mismatch |sum a - sum b| (e.g. ~1e-8 for float32-normalised marginals), so pick tol above it.
    With `eps_scaling` and an epsilon below a tenth of the cost range, the duals are first warmed up on a ladder
    of halving epsilons (each solved to a loose tolerance); plain Sinkhorn needs O(range/epsilon) more iterations
    there. Otherwise (and with eps_scaling=False) the iterates are exactly those of plain Sinkhorn (POT's
    `sinkhorn_knopp`). Iterations of all stages count towards max_iter and `iters`. The warm-up stages advance
    together for the whole batch; the final stage stops each pair on its own.
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
    if not bool(torch.isfinite(cost).all()):
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

    if B == 0:
        no_iters = torch.zeros(0, dtype=torch.int64, device=cost.device)
        return SinkhornResult(plan=cost.new_empty(0, n, m), iters=no_iters, err=cost.new_empty(0))
    stages = epsilon_schedule(cost, float(epsilon)) if eps_scaling else [float(epsilon)]
    stage = 0
    # Warm-up stages only need to bring the duals near the next stage's solution.
    warm_tol = (STAGE_TOL * mass_a).clamp(min=tol)
    # A scaling beyond this magnitude is absorbed into the duals before u * K~ * v can overflow or underflow.
    log_tau = 0.25 * math.log(torch.finfo(cost.dtype).max)

    plan = cost.new_empty(B, n, m)
    iters = torch.zeros(B, dtype=torch.int64, device=cost.device)
    err = cost.new_empty(B)

    active = torch.arange(B, device=cost.device)
    C, a_, b_ = cost, a, b
    log_a, log_b = a.log(), b.log()
    f = cost.new_zeros(B, n)
    g = cost.new_zeros(B, m)
    # Plain start (f = g = 0, POT's iterates) while exp(-C/eps) is safely representable; else the log domain.
    need_lse = float(cost.abs().amax()) / stages[0] >= 2 * log_tau
    done = 0

    def finish(out: torch.Tensor, u: torch.Tensor, kern: torch.Tensor, v: torch.Tensor, viol: torch.Tensor) -> None:
        """Write out the pairs selected by `out` (bool over the working batch)."""
        idx = active[out]
        plan[idx] = u[out, :, None] * kern[out] * v[out, None, :]
        iters[idx] = done
        err[idx] = viol[out]

    while active.numel() > 0:
        if done + 1 >= max_iter:
            stage = len(stages) - 1  # out of iterations: the last step goes to the final epsilon
        eps = stages[stage]
        last_stage = stage == len(stages) - 1
        if need_lse:
            # One exact log-domain iteration: afterwards K~ has entries <= 1 and rows summing to a.
            g = eps * (log_b - torch.logsumexp((f[:, :, None] - C) / eps, dim=1))
            f = eps * (log_a - torch.logsumexp((g[:, None, :] - C) / eps, dim=2))
            done += 1
            need_lse = False
        kern = torch.exp((f[:, :, None] + g[:, None, :] - C) / eps)
        u = torch.ones_like(f)
        v = torch.ones_like(g)
        k_v = kern.sum(-1)
        live = torch.ones_like(active, dtype=torch.bool)  # pairs of the working batch still iterating
        while True:
            kt_u = torch.bmm(u[:, None, :], kern)[:, 0, :]
            viol = _marginal_violation(u, k_v, a_, v, kt_u, b_)
            if not last_stage and (done + 1 >= max_iter or bool((viol <= warm_tol).all())):
                f = f + eps * u.log()
                g = g + eps * v.log()
                stage += 1
                break
            keep = live & (viol > tol) if done < max_iter else torch.zeros_like(live)
            newly = live & ~keep
            if bool(newly.any()):
                finish(newly, u, kern, v, viol)
                live = keep
                if int(live.sum()) * 2 <= live.numel():
                    # Shrink the working batch once at least half of it is done (copying K~ costs an iteration).
                    active, C, a_, b_, log_a, log_b, warm_tol = (
                        t[live] for t in (active, C, a_, b_, log_a, log_b, warm_tol)
                    )
                    f, g, u, v, kern, kt_u, k_v = (t[live] for t in (f, g, u, v, kern, kt_u, k_v))
                    live = live[live]
                    if active.numel() == 0:
                        break
            v_new = b_ / kt_u
            k_v = torch.bmm(kern, v_new[:, :, None])[:, :, 0]
            u_new = a_ / k_v
            # Finished pairs keep their scalings (their products are ignored from now on).
            u_new = torch.where(live[:, None], u_new, u)
            v_new = torch.where(live[:, None], v_new, v)
            log_u, log_v = u_new.log(), v_new.log()
            finite = bool(torch.isfinite(log_u).all() & torch.isfinite(log_v).all())
            if not (finite and float(log_u.abs().max()) < log_tau and float(log_v.abs().max()) < log_tau):
                if finite:
                    # Absorb the new scalings: this iteration counts. (Absorbing the previous ones instead would
                    # loop for ever when they are still the all-ones of a freshly rebuilt K~.)
                    f = f + eps * log_u
                    g = g + eps * log_v
                    done += 1
                else:
                    # Underflow: absorb the last safe scalings and redo this iteration in the log domain.
                    f = f + eps * u.log()
                    g = g + eps * v.log()
                need_lse = not finite
                if not bool(live.all()):  # finished pairs are written out already
                    active, C, a_, b_, log_a, log_b, warm_tol, f, g = (
                        t[live] for t in (active, C, a_, b_, log_a, log_b, warm_tol, f, g)
                    )
                break
            u, v = u_new, v_new
            done += 1
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
