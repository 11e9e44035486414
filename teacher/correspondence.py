"""Dense correspondence between a query object and its memory-bank partners (DiscoBox section 3.3, appendix B).

Two solvers on the g x g RoI feature grid, n = g*g cells, batched over the K partners:

- mode "icm" (the paper): iterated conditional modes. C_u = cosine similarity of relu+L2-normalised features;
  T^0 = Sinkhorn(C_u) with the mask marginals of appendix B (mu = 1[m > 0.5] * 0.4 + 0.6, normalised); then
  C_g^t(i,k) = sum_{j,l} exp(-|off_ik - off_jl|^2 / (2 gamma)) T^t(j,l) with off_ik = pos_k - pos_i, and
  T^{t+1} = Sinkhorn(C_u + w_g * C_g^t / max C_g^t). C_g depends only on the displacement off_ik, so it is computed
  as a displacement histogram of T smoothed by a separable Gaussian, O(n^2) rather than the literal O(n^4) sum.
  Sinkhorn (log-stabilised, `kernels.sinkhorn`) maximises similarity, i.e. runs on the cost -C. The division by
  max C_g keeps the geometric term on C_u's scale whatever the spread of T (our choice; the paper gives no scale).
- mode "official": DiscoBox's ``SemanticCorrSolver.solve``, regularised Hough-style message passing over joint
  offsets (no Sinkhorn), exactly as the released code computes it (goldens ``discobox_corrsolve_*``).

Also here: the official appearance OT (``appearance_similarityOT``, goldens ``discobox_sinkhorn_*``), the official
``corr_loss`` (double softmax, as released), ``T_reweighted``, ``superres_T`` and the cross-image unary
(``cross_image_unary``) that feeds the CRF.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.sinkhorn import sinkhorn, sinkhorn_official

from .config import CorrespondenceConfig

MODES = ("icm", "official")
# Appendix B's step function for the Sinkhorn marginals: fg cells weigh 1.0, bg cells 0.6.
_MARGINAL_FG, _MARGINAL_BG = 1.0, 0.6


@dataclass(frozen=True)
class Correspondence:
    """Result of `correspond` for one query and K partners (n = g*g cells, row = query cell, column = partner cell).

    plan (K,n,n): icm -> the last Sinkhorn plan (a transport plan, total mass 1); official -> solve's T.
    match (K,n) int64: the top partner cell of each query cell (argmax of the plan's row).
    weight (K,n): the share of the row's mass that goes to that match, in [0, 1].
    similarity (K,n,n): C_u, the cosine similarity of the normalised features.
    transfer (K,n,n): the row-stochastic matrix that carries partner masks to the query for `cross_image_unary`
        (icm: the row-normalised plan; official: `T_reweighted(plan, similarity)`, as the released code does).
    """

    plan: torch.Tensor
    match: torch.Tensor
    weight: torch.Tensor
    similarity: torch.Tensor
    transfer: torch.Tensor


def relu_and_l2_norm_feat(feat: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """DiscoBox feature normalisation: relu, then divide by (sqrt(sum f^2 + 1e-6) + 1e-6) along `dim`."""
    feat = F.relu(feat)
    norm = ((feat**2).sum(dim=dim, keepdim=True) + 1e-6) ** 0.5
    return feat / (norm + 1e-6)


def cosine_volume(f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
    """C_u as the official solve computes it: cosine with norms + 1e-4.

    f0 (1,C,g,g) query, f1 (K,C,g,g) partners -> (K, g*g, g*g), row = query cell, column = partner cell.
    """
    q = f0.reshape(f0.shape[0], f0.shape[1], -1).transpose(2, 1)
    k = f1.reshape(f1.shape[0], f1.shape[1], -1)
    q = q / (torch.linalg.vector_norm(q, dim=2, keepdim=True) + 1e-4)
    k = k / (torch.linalg.vector_norm(k, dim=1, keepdim=True) + 1e-4)
    return torch.matmul(q, k)


# ----------------------------------------------------------------------------------------------------------------
# Official pieces


def appearance_similarityOT(
    m0: torch.Tensor, m1: torch.Tensor, sim: torch.Tensor, eps: float = 0.05, low_score: float = 0.3, exp: float = 1.0
) -> torch.Tensor:
    """DiscoBox ``appearance_similarityOT``: PI = clamp(n * Sinkhorn_100(mu, nu, 1 - clamp(sim, .3, .7)), 0)^exp.

    m0 (B,n), m1 (B,m) soft masks, sim (B,n,m) similarity. mu, nu = masks clamped to [low_score, 1 - low_score] and
    normalised. When the plan has NaN (fixed-iteration Sinkhorn underflows) epsilon is doubled and the solve
    retried while epsilon < 5, as the reference does; ValueError if no epsilon works.
    """
    cost = 1 - sim.clamp(min=0.3, max=0.7)
    m0 = m0.clamp(min=low_score, max=1 - low_score)
    m1 = m1.clamp(min=low_score, max=1 - low_score)
    mu = m0 / m0.sum(1, keepdim=True)
    nu = m1 / m1.sum(1, keepdim=True)
    epsilon = eps
    while epsilon < 5:
        plan = sinkhorn_official(cost, mu, nu, reg=epsilon)
        if not bool(torch.isnan(plan).any()):
            return torch.pow(torch.clamp(sim.shape[1] * plan, min=0), exp)
        epsilon *= 2.0
    raise ValueError(f"appearance_similarityOT: Sinkhorn gives NaN for every epsilon in [{eps}, 5)")


def pass_message(T: torch.Tensor, g: int) -> torch.Tensor:
    """DiscoBox ``pass_message``: average of T over the 9 joint offsets d in {-1,0,1}^2 that stay on the grid.

    T (K, g*g, g*g) -> (K, g*g, g*g) with out[i, j] = mean over valid d of T[i - d, j - d] (the same shift applied
    to the query cell i and the partner cell j, so a consistent displacement reinforces itself).
    """
    vol = T.reshape(T.shape[0], g, g, g, g)
    total = torch.zeros_like(vol)
    count = torch.zeros_like(vol)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            dst_y, src_y = slice(max(0, dy), min(g + dy, g)), slice(max(0, -dy), min(g - dy, g))
            dst_x, src_x = slice(max(0, dx), min(g + dx, g)), slice(max(0, -dx), min(g - dx, g))
            count[:, dst_y, dst_x, dst_y, dst_x] += 1
            total[:, dst_y, dst_x, dst_y, dst_x] += vol[:, src_y, src_x, src_y, src_x]
    return (total / count).reshape(T.shape)


def _distance_mask(g: int, radius: int, like: torch.Tensor) -> torch.Tensor:
    """(g*g, g*g) 0/1: 1 where the two cells are within `radius` along both axes."""
    yy, xx = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    y, x = yy.reshape(-1).to(like.device), xx.reshape(-1).to(like.device)
    near = ((y[:, None] - y[None, :]).abs() <= radius) & ((x[:, None] - x[None, :]).abs() <= radius)
    return near.to(like.dtype)


def official_solve(
    f0: torch.Tensor, f1: torch.Tensor, num_iter: int = 10, num_smooth_iter: int = 1, dist_kernel: int = 9
) -> tuple[torch.Tensor, torch.Tensor]:
    """DiscoBox ``SemanticCorrSolver.solve`` on normalised features: returns (C_u, T), each (K, g*g, g*g).

    f0 (1,C,g,g) query and f1 (K,C,g,g) partners, both relu+L2-normalised. C starts as C_u restricted to
    |dy|, |dx| <= dist_kernel // 2; then num_iter times: votes = pass_message(C) (num_smooth_iter rounds, each
    row-normalised by sum + 1e-4), C = C_u + votes, C /= (row sum + 1e-4). C_u is not distance-masked after the
    first iteration, as released.
    """
    g = f0.shape[-1]
    cu = cosine_volume(f0, f1)
    c = cu * _distance_mask(g, dist_kernel // 2, cu)
    for _ in range(num_iter):
        votes = c
        for _ in range(num_smooth_iter):
            votes = pass_message(votes, g)
            votes = votes / (votes.sum(2, keepdim=True) + 1e-4)
        c = cu + votes
        c = c / (c.sum(2, keepdim=True) + 1e-4)
    return cu, c


def corr_loss(cu: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """The released DiscoBox NCE term: CrossEntropy(softmax(C_u), argmax T) -- a double softmax, kept as released.

    cu, T (K,n,m) -> scalar mean over the K*n query cells.
    """
    assignment = T.argmax(2).reshape(-1)
    return F.cross_entropy(F.softmax(cu, 2).reshape(-1, cu.shape[2]), assignment)


def T_reweighted(T: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """T * softmax(C_u) over partner cells, rows normalised by (sum + 1e-5). (K,n,m) -> (K,n,m)."""
    T = T * F.softmax(cu, 2)
    return T / (T.sum(2, keepdim=True) + 1e-5)


def superres_T(T: torch.Tensor, size: int) -> torch.Tensor:
    """DiscoBox ``superres_T``: bilinear (align_corners=False) upsampling of both grid axes of T to size x size.

    T (K, g*g, g*g) -> (K, size^2, size^2), scaled by g^2 / size^2 (rows keep roughly their mass).
    """
    k, n, _ = T.shape
    g = _grid_side(n, "superres_T")
    up = F.interpolate(T.reshape(k, n, g, g), (size, size), mode="bilinear", align_corners=False)
    up = up.reshape(k, n, size * size).transpose(1, 2).reshape(k, size * size, g, g)
    up = F.interpolate(up, (size, size), mode="bilinear", align_corners=False)
    return up.reshape(k, size * size, size * size).transpose(1, 2) * (n / (size * size))


def _interpolation_matrix(g: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """(size^2, g^2) matrix U with U @ vec(x) == vec(bilinear(x, size, align_corners=False)) for x (g,g)."""
    eye = torch.eye(g, dtype=like.dtype, device=like.device)[:, None, :]
    a = F.interpolate(eye, size=size, mode="linear", align_corners=False)[:, 0, :].T
    return torch.kron(a, a)


def cross_image_unary(plan: torch.Tensor, q_mask: torch.Tensor, k_masks: torch.Tensor) -> torch.Tensor:
    """Cross-image [bg, fg] support of each query pixel, from the partners' masks through the correspondence.

    plan (K, g*g, g*g) row-stochastic transfer (`Correspondence.transfer`), q_mask (R,R) and k_masks (K,R,R) soft
    masks in [0, 1]. As released, with T_sr = superres_T(plan, R):
      fg_i = mean_k sum_j T_sr(i,j) [q_i k_j > 0.5] clamp(k_j, 0.1, 0.9),
      bg_i = the same with 1 - q, 1 - k.
    Returns (2,R,R) [bg, fg].

    Computed without the R^2 x R^2 volume: T_sr = (g^2/R^2) U T U^T with U the bilinear interpolation matrix, and
    [q_i k_j > 0.5] = [k_j > 0.5 / q_i] keeps, for each row i, the partner pixels above a threshold. With the
    partner pixels sorted by k, that is a suffix, so fg_i = (U_i T) . S(m_i) where S holds the suffix sums of
    clamp(k_j) U_j^T: O(R^2 g^2) per partner instead of O(R^4).
    """
    if plan.dim() != 3 or k_masks.dim() != 3 or q_mask.dim() != 2 or plan.shape[0] != k_masks.shape[0]:
        raise ValueError(
            f"cross_image_unary: expected plan (K,n,n), q_mask (R,R), k_masks (K,R,R); got {tuple(plan.shape)}, "
            f"{tuple(q_mask.shape)}, {tuple(k_masks.shape)}"
        )
    r = q_mask.shape[0]
    if q_mask.shape != (r, r) or k_masks.shape[1:] != (r, r):
        raise ValueError(
            f"cross_image_unary: masks must be square and equal, got {tuple(q_mask.shape)}, {tuple(k_masks.shape)}"
        )
    n = plan.shape[1]
    up = _interpolation_matrix(_grid_side(n, "cross_image_unary"), r, plan)
    q = q_mask.reshape(-1).to(plan.dtype)
    out = plan.new_zeros(2, r * r)
    for t, k in zip(plan, k_masks.to(plan.dtype).reshape(plan.shape[0], -1)):
        rows_t = up @ t * (n / (r * r))                                   # (R^2, g^2): rows of U T, scaled
        for label, (qq, kk) in enumerate(((1 - q, 1 - k), (q, k))):
            k_sorted, order = torch.sort(kk)
            weighted = up[order] * kk[order].clamp(0.1, 0.9)[:, None]     # (R^2, g^2)
            suffix = torch.cat([weighted.flip(0).cumsum(0).flip(0), weighted.new_zeros(1, n)])
            first = torch.searchsorted(k_sorted, 0.5 / qq.clamp_min(1e-12), right=True)
            out[label] += (rows_t * suffix[first]).sum(1)
    return out.reshape(2, r, r) / plan.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# The paper's ICM


def mask_marginal(mask: torch.Tensor) -> torch.Tensor:
    """Appendix B marginal: 1[m > 0.5] * 0.4 + 0.6 per cell, normalised to sum 1. (B,n) -> (B,n)."""
    mu = torch.where(mask > 0.5, _MARGINAL_FG, _MARGINAL_BG).to(mask.dtype)
    return mu / mu.sum(1, keepdim=True)


def _displacement_index(g: int, device: torch.device) -> torch.Tensor:
    """(g*g, g*g) int64 id of off_ik = pos_k - pos_i on the (2g-1) x (2g-1) displacement grid."""
    yy, xx = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    y, x = yy.reshape(-1), xx.reshape(-1)
    dy = y[None, :] - y[:, None] + g - 1
    dx = x[None, :] - x[:, None] + g - 1
    return (dy * (2 * g - 1) + dx).to(device)


def geometric_term(T: torch.Tensor, g: int, gamma: float) -> torch.Tensor:
    """C_g(i,k) = sum_{j,l} exp(-|off_ik - off_jl|^2 / (2 gamma)) T(j,l) (paper Eq. for C_g). (K,n,n) -> (K,n,n).

    Because the weight depends on offsets only, C_g(i,k) = (G * H)(off_ik), H = the displacement histogram of T
    and G the (separable) Gaussian; exact, not an approximation.
    """
    if gamma <= 0:
        raise ValueError(f"geometric_term: gamma must be > 0, got {gamma}")
    k = T.shape[0]
    side = 2 * g - 1
    index = _displacement_index(g, T.device)
    hist = T.new_zeros(k, side * side).index_add_(1, index.reshape(-1), T.reshape(k, -1))
    d = torch.arange(side, device=T.device, dtype=T.dtype)
    gauss = torch.exp(-((d[:, None] - d[None, :]) ** 2) / (2 * gamma))
    smooth = gauss @ hist.reshape(k, side, side) @ gauss
    return smooth.reshape(k, -1)[:, index.reshape(-1)].reshape(T.shape)


def icm_solve(
    f0: torch.Tensor, f1: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor, cfg: CorrespondenceConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's ICM: returns (C_u, T) with T (K,n,n) the last Sinkhorn plan (module docstring).

    f0 (1,C,g,g), f1 (K,C,g,g) normalised features; m0 (g*g,), m1 (K,g*g) soft masks on the grid.
    """
    if cfg.icm_iters < 1:
        raise ValueError(f"icm_solve: icm_iters must be >= 1, got {cfg.icm_iters}")
    g = f0.shape[-1]
    k = f1.shape[0]
    cu = cosine_volume(f0, f1)
    a = mask_marginal(m0.reshape(1, -1).expand(k, -1))
    b = mask_marginal(m1.reshape(k, -1))
    c = cu
    for t in range(cfg.icm_iters):
        if t > 0:
            cg = geometric_term(plan, g, cfg.geometric_gamma)
            c = cu + cfg.geometric_weight * cg / cg.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        plan = sinkhorn(-c, a, b, cfg.epsilon, tol=cfg.sinkhorn_tol, max_iter=cfg.sinkhorn_max_iter).plan
    return cu, plan


def _grid_side(n: int, where: str) -> int:
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"{where}: {n} cells do not form a square grid")
    return g


def _to_grid(mask: torch.Tensor, g: int) -> torch.Tensor:
    """(B,h,w) soft masks -> (B, g*g), bilinearly resized (align_corners=False) when h, w != g."""
    if mask.shape[-2:] != (g, g):
        mask = F.interpolate(mask[:, None], (g, g), mode="bilinear", align_corners=False)[:, 0]
    return mask.reshape(mask.shape[0], -1)


def correspond(
    f_query: torch.Tensor,
    f_partners: torch.Tensor,
    m_query: torch.Tensor,
    m_partners: torch.Tensor,
    cfg: CorrespondenceConfig,
) -> Correspondence:
    """Dense correspondence from a query RoI to K partner RoIs (mode from ``cfg.mode``; module docstring).

    f_query (C,g,g) and f_partners (K,C,g,g) RoI features (relu + L2 normalisation is applied here; it is
    idempotent up to ~1e-6 on features that are already normalised), m_query (h,w) and m_partners (K,h,w) soft
    masks in [0, 1] at any resolution (resized to the grid for the Sinkhorn marginals; unused by "official").
    """
    if cfg.mode not in MODES:
        raise ValueError(f"correspond: mode must be one of {MODES}, got {cfg.mode!r}")
    if f_query.dim() != 3 or f_partners.dim() != 4 or f_partners.shape[1:] != f_query.shape:
        raise ValueError(
            f"correspond: expected f_query (C,g,g) and f_partners (K,C,g,g) with the same C,g; got "
            f"{tuple(f_query.shape)} and {tuple(f_partners.shape)}"
        )
    g = f_query.shape[-1]
    if f_query.shape[-2] != g or f_partners.shape[0] == 0:
        raise ValueError(f"correspond: need a square grid and at least one partner, got {tuple(f_partners.shape)}")
    if m_query.dim() != 2 or m_partners.dim() != 3 or m_partners.shape[0] != f_partners.shape[0]:
        raise ValueError(
            f"correspond: expected m_query (h,w) and m_partners (K,h,w); got {tuple(m_query.shape)} and "
            f"{tuple(m_partners.shape)}"
        )
    with torch.no_grad():
        f0 = relu_and_l2_norm_feat(f_query[None].float())
        f1 = relu_and_l2_norm_feat(f_partners.float())
        if cfg.mode == "official":
            cu, plan = official_solve(f0, f1, cfg.num_iter, cfg.num_smooth_iter, cfg.dist_kernel)
            transfer = T_reweighted(plan, cu)
        else:
            m0 = _to_grid(m_query[None].float(), g)[0]
            m1 = _to_grid(m_partners.float(), g)
            cu, plan = icm_solve(f0, f1, m0, m1, cfg)
            transfer = plan / plan.sum(2, keepdim=True)
        match = plan.argmax(2)
        rows = plan / plan.sum(2, keepdim=True)
        weight = rows.gather(2, match[..., None])[..., 0]
    return Correspondence(plan=plan, match=match, weight=weight, similarity=cu, transfer=transfer)
