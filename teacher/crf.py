"""Mean-field CRF over RoIs: DiscoBox's structured teacher (paper section 3.2-3.3, appendix A).

Two modes, both on the kernels' backends (`kernels.meanfield`, `kernels.message_passing`):

- ``meanfield_soft``: the paper's CRF solved with soft mean-field. Energy of a labelling x (labels bg=0, fg=1):

      E(x) = sum_i theta_i(x_i) + sum_{edges (i,j)} w_ij [x_i != x_j]
      theta_i(l) = -log max(p_i(l), floor) - w2 * c_i(l)          (c: cross-image [bg, fg] support, may be None)
      w_ij = w1 * exp(-|I_i - I_j|^2 / (2 zeta^2))                  (8-neighbourhood with dilation, each edge once)

  and fg is forbidden outside the box (Q_fg = 0 there). The paper sums tau_p over ordered pairs (i, j in N(i)),
  i.e. each edge twice; here each edge counts once, so our w1 is twice the paper's. ``crf_energy`` returns the
  mean-field free energy F(Q) = E_Q[E(x)] - H(Q), which the update below decreases monotonically.

  Update schedule: the fully parallel mean-field update can oscillate (two neighbours flip each other back and
  forth) and then increases F. We instead update the pixels in four colour classes ((y // d) % 2, (x // d) % 2):
  no two pixels of a class are neighbours, so updating a whole class at once is exact block-coordinate descent on
  F and never increases it. One "sweep" = the four classes in turn; a RoI stops when none of its marginals moves
  more than ``tol`` in a sweep, or after ``iters`` sweeps. The sweeps are `kernels.meanfield.meanfield_sweeps`:
  on CPU tensors one fused C++ pass per RoI, elsewhere four message passes per sweep with ``cfg.backend``.

- ``meanfield_official``: DiscoBox's ``MeanField`` as the released code computes it (3x3 kernel including the
  centre, states re-thresholded to {base, 1 - base} after every iteration; see goldens README).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.meanfield import meanfield_sweeps
from kernels.message_passing import message_passing, neighbour_offsets

from .affinity import dice_loss
from .config import CRFConfig


def _check_map(name: str, t: object, channels: int | None, batch: int | None = None) -> torch.Tensor:
    """Validate a (B,C,h,w) floating tensor; returns it."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (N,C,h,w) tensor, got shape {getattr(t, 'shape', None)}")
    if channels is not None and t.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name}: expected batch {batch}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating tensor, got {t.dtype}")
    return t


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """y[..., r, c] = x[..., r + dy, c + dx], zero where that lies outside the map. x (..., h, w)."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    y0, y1 = max(0, -dy), min(h, h - dy)
    x0, x1 = max(0, -dx), min(w, w - dx)
    if y0 < y1 and x0 < x1:
        out[..., y0:y1, x0:x1] = x[..., y0 + dy : y1 + dy, x0 + dx : x1 + dx]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Soft mean-field (the paper)


def colour_potts_kernel(image: torch.Tensor, w1: float, zeta: float, dilation: int = 1) -> torch.Tensor:
    """Pairwise Potts weights w1 * exp(-|I_i - I_j|^2 / (2 zeta^2)) towards the 8 dilated neighbours.

    image (N,C,h,w) float colour -> (N,8,h,w) of image's dtype, in `neighbour_offsets(3, dilation)` order; 0 where
    the neighbour lies outside the image (so the weights are symmetric: w[k](i) == w[k'](i + d_k), d_k' = -d_k).
    """
    if zeta <= 0 or w1 < 0:
        raise ValueError(f"colour_potts_kernel: need zeta > 0 and w1 >= 0, got zeta={zeta}, w1={w1}")
    offsets = neighbour_offsets(3, dilation)
    ones = torch.ones_like(image[:, :1])
    out = []
    for dy, dx in offsets:
        d2 = ((_shift(image, dy, dx) - image) ** 2).sum(1, keepdim=True)
        out.append(w1 * torch.exp(-d2 / (2.0 * zeta**2)) * _shift(ones, dy, dx))
    return torch.cat(out, 1)


def soft_unary(unary: torch.Tensor, cross_unary: torch.Tensor | None, cfg: CRFConfig) -> torch.Tensor:
    """Unary energies theta (N,2,h,w) = -log max(p, floor) - w2 * cross_unary, from probabilities [bg, fg]."""
    theta = -torch.log(unary.clamp(min=cfg.unary_floor, max=1.0))
    if cross_unary is not None:
        theta = theta - cfg.cross_image_weight * cross_unary
    return theta


def _check_soft_inputs(unary, image, box_mask, cross_unary) -> None:
    _check_map("meanfield_soft: unary", unary, 2)
    n, _, h, w = unary.shape
    _check_map("meanfield_soft: image", image, None)
    if image.shape[0] not in (1, n) or image.shape[2:] != (h, w):
        raise ValueError(f"meanfield_soft: image shape {tuple(image.shape)} does not fit unary {tuple(unary.shape)}")
    _check_map("meanfield_soft: box_mask", box_mask, 1, n)
    if box_mask.shape[2:] != (h, w):
        raise ValueError(f"meanfield_soft: box_mask shape {tuple(box_mask.shape)} does not fit {(h, w)}")
    if cross_unary is not None:
        _check_map("meanfield_soft: cross_unary", cross_unary, 2, n)
        if cross_unary.shape[2:] != (h, w):
            raise ValueError(f"meanfield_soft: cross_unary shape {tuple(cross_unary.shape)} does not fit {(h, w)}")
    if unary.numel() and (unary.min() < 0 or unary.max() > 1 or not torch.isfinite(unary).all()):
        raise ValueError("meanfield_soft: unary must hold probabilities in [0, 1]")


def meanfield_soft(
    unary: torch.Tensor,
    image: torch.Tensor,
    box_mask: torch.Tensor,
    cross_unary: torch.Tensor | None,
    cfg: CRFConfig,
) -> torch.Tensor:
    """The paper's soft mean-field over a batch of RoIs (schedule and energy: module docstring).

    unary (N,2,h,w) probabilities [bg, fg] (e.g. [1-m, m]); image (N|1,3,h,w) colour in the units ``cfg.zeta``
    is meant for (normalised colour); box_mask (N,1,h,w) (> 0.5 = inside the box); cross_unary (N,2,h,w) [bg, fg]
    cross-image support from `teacher.correspondence.cross_image_unary`, or None.
    Returns the marginals Q (N,2,h,w) of unary's dtype; Q_fg is exactly 0 outside the box.
    """
    _check_soft_inputs(unary, image, box_mask, cross_unary)
    image = image.to(unary.dtype)
    with torch.no_grad():
        theta = soft_unary(unary, cross_unary, cfg).to(unary.dtype)
        kernel = colour_potts_kernel(image, cfg.w1, cfg.zeta, cfg.dilation)
        return meanfield_sweeps(theta, kernel, box_mask > 0.5, cfg.dilation, cfg.iters, cfg.tol, cfg.backend)


def crf_energy(
    q: torch.Tensor,
    unary: torch.Tensor,
    image: torch.Tensor,
    box_mask: torch.Tensor,
    cross_unary: torch.Tensor | None,
    cfg: CRFConfig,
) -> torch.Tensor:
    """Mean-field free energy F(Q) = E_Q[E(x)] - H(Q) of the soft CRF, per RoI, in float64.

    q (N,2,h,w) marginals [bg, fg]; the other arguments as for `meanfield_soft`. Returns (N,) float64.
    E_Q[E] = sum_i,l Q_i(l) theta_i(l) + sum_edges w_ij (1 - sum_l Q_i(l) Q_j(l)); H = -sum Q log Q. Q_fg must be 0
    outside the box (the constraint is a hard one: otherwise +inf is returned for that RoI).
    """
    _check_soft_inputs(unary, image, box_mask, cross_unary)
    _check_map("crf_energy: q", q, 2, unary.shape[0])
    q, unary, image = q.double(), unary.double(), image.double()
    cross = None if cross_unary is None else cross_unary.double()
    theta = soft_unary(unary, cross, cfg)
    kernel = colour_potts_kernel(image, cfg.w1, cfg.zeta, cfg.dilation)
    offsets = neighbour_offsets(3, cfg.dilation)
    msg = message_passing(q, kernel, offsets, backend="reference")
    kernel = kernel.expand(q.shape[0], -1, -1, -1)
    # Every edge appears once from each end in the sums over (i, k), hence the halves.
    pairwise = 0.5 * (kernel.sum((1, 2, 3)) - (q * msg).sum((1, 2, 3)))
    unary_term = (q * theta).sum((1, 2, 3))
    neg_entropy = torch.xlogy(q, q).sum((1, 2, 3))
    energy = unary_term + pairwise + neg_entropy
    violated = ((q[:, 1:] > 0) & (box_mask <= 0.5)).flatten(1).any(1)
    return torch.where(violated, torch.full_like(energy, float("inf")), energy)


# ----------------------------------------------------------------------------------------------------------------
# The official DiscoBox MeanField


def official_kernel(
    color_feat: torch.Tensor, kernel_size: int = 3, alpha0: float = 2.0, theta0: float = 0.5, theta1: float = 30.0
) -> torch.Tensor:
    """DiscoBox ``MeanField`` kernel: alpha0 * exp(-|F_nb - F_c|^2 / (2 theta0^2) - |o|^2 / (2 theta1^2)).

    color_feat (B,3,h,w) normalised colour -> (B,k*k,h,w), offsets `neighbour_offsets(k, 1, centre=True)`.
    F = color_feat + 10 and neighbours outside the image read F = 0 (zero padding, as the code's unfold does), which
    makes their weight vanish.
    """
    feat = color_feat + 10
    out = []
    for dy, dx in neighbour_offsets(kernel_size, 1, centre=True):
        d2 = ((_shift(feat, dy, dx) - feat) ** 2).sum(1, keepdim=True)
        spatial = float(dy * dy + dx * dx)
        out.append(alpha0 * torch.exp(-d2 / (2 * theta0**2) + (-(spatial / (2 * theta1**2)))))
    return torch.cat(out, 1)


def _binarise(p: torch.Tensor, base: float) -> torch.Tensor:
    """(p > 0.5) -> 1 - base else base, computed the way the reference does in float32."""
    return (p > 0.5).to(p.dtype) * (1 - base * 2) + base


def meanfield_official(
    x: torch.Tensor,
    targets: torch.Tensor,
    color_feat: torch.Tensor,
    inter_img_mask: torch.Tensor | None = None,
    iters: int = 10,
    *,
    kernel_size: int = 3,
    alpha0: float = 2.0,
    theta0: float = 0.5,
    theta1: float = 30.0,
    base: float = 0.1,
    gamma: float = 0.01,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """DiscoBox's ``MeanField.forward`` (goldens README, ``discobox_meanfield_*``).

    x (N,1,h,w) mask probabilities (the code passes (teacher + student) / 2); targets (N,1,h,w) box masks;
    color_feat (1|N,3,h,w) normalised colour at (h,w); inter_img_mask (N,2,h,w) [bg_ci, fg_ci] or None.
    Per iteration and label l: E_l = sum_o kernel_o * (-log Q_l(nb_o)) (zero padded), f = exp(-E) (+ gamma *
    inter_img_mask), f_fg *= targets, f += 1e-6, normalise over l, re-threshold to {base, 1 - base}.
    Returns dict(kernel (1|N,k*k,h,w), unary_init, state_iter1, state_final (N,2,h,w), pseudo_label (N,1,h,w)
    float 0/1, valid (N,) float: 1 when the fg count is within [5%, 95%] of h*w).
    """
    _check_map("meanfield_official: x", x, 1)
    n, _, h, w = x.shape
    _check_map("meanfield_official: targets", targets, 1, n)
    _check_map("meanfield_official: color_feat", color_feat, 3)
    if color_feat.shape[0] not in (1, n) or color_feat.shape[2:] != (h, w) or targets.shape[2:] != (h, w):
        raise ValueError(
            f"meanfield_official: shapes x {tuple(x.shape)}, targets {tuple(targets.shape)}, "
            f"color_feat {tuple(color_feat.shape)} do not fit"
        )
    if inter_img_mask is not None:
        _check_map("meanfield_official: inter_img_mask", inter_img_mask, 2, n)
        if inter_img_mask.shape[2:] != (h, w):
            raise ValueError(f"meanfield_official: inter_img_mask shape {tuple(inter_img_mask.shape)} != (N,2,h,w)")
    if iters < 1:
        raise ValueError(f"meanfield_official: iters must be >= 1, got {iters}")
    with torch.no_grad():
        kernel = official_kernel(color_feat.to(x.dtype), kernel_size, alpha0, theta0, theta1)
        offsets = neighbour_offsets(kernel_size, 1, centre=True)
        u = _binarise(x * targets, base)
        state = torch.cat([1 - u, u], 1)
        unary_init = state
        state_iter1 = state
        for it in range(iters):
            energy = message_passing(-torch.log(state), kernel, offsets, backend=backend)
            f = torch.exp(-energy)
            if inter_img_mask is not None:
                f = f + inter_img_mask * gamma
            f = torch.cat([f[:, :1], f[:, 1:] * targets], 1)
            f = f + 1e-6
            f = f / f.sum(1, keepdim=True)
            state = _binarise(f, base)
            if it == 0:
                state_iter1 = state
        pseudo_label = (state[:, 1:] > 0.5).to(x.dtype)
        count = pseudo_label.flatten(1).sum(1)
        valid = ((count >= h * w * 0.05) & (count <= h * w * 0.95)).to(x.dtype)
    return dict(
        kernel=kernel,
        unary_init=unary_init,
        state_iter1=state_iter1,
        state_final=state,
        pseudo_label=pseudo_label,
        valid=valid,
    )


def loss_ts(s_prob: torch.Tensor, targets: torch.Tensor, pseudo_label: torch.Tensor) -> torch.Tensor:
    """DiscoBox's teacher-student term: dice_loss(s_prob * maxpool3x3(targets), pseudo_label) -> (N,).

    s_prob (N,1,h,w) student probabilities, targets (N,1,h,w) box masks, pseudo_label (N,1,h,w) from
    `meanfield_official`. The box is enlarged by one pixel (3x3 max-pool) as the reference does.
    """
    enlarged = F.max_pool2d(targets.float(), kernel_size=3, stride=1, padding=1)
    return dice_loss(s_prob[:, 0] * enlarged[:, 0], pseudo_label[:, 0])
