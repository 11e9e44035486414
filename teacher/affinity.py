"""Box-supervised mask objectives: BoxInst projection + pairwise colour affinity, DiscoBox Dice/MIL, AsyInst
depth-gradient edges and the asymmetric affinity loss (AsyInst Eq. 1-3, 9-13).

Neighbour axis convention (size 8): the 3x3 offsets with dilation d in ``F.unfold`` order without the centre,
(dy,dx) = (-d,-d),(-d,0),(-d,+d),(0,-d),(0,+d),(+d,-d),(+d,0),(+d,+d); entry [n,e,y,x] is the edge from the
centre (y,x) to (y+dy_e, x+dx_e). Direction e and 7-e are the two orientations of the same pixel pair.
The reference semantics are pinned by ``../shared/goldens`` (see its README).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from teacher.color import neighbour_offsets
from teacher.config import ObjectiveConfig

# One orientation of each of the 4 pixel pairs per pixel: (0,+d), (+d,-d), (+d,0), (+d,+d); 7-e is the reverse
# (so the reverse directions of 4..7 are 3..0: ``weights[:, :4].flip(1)``).
_PAIR_DIRECTIONS = (4, 5, 6, 7)


def box_bitmasks(boxes: torch.Tensor, height: int, width: int, stride: int = 1) -> torch.Tensor:
    """Rasterise fractional boxes as BoxInst does, then sample at the mask stride.

    boxes: (N,4) x1,y1,x2,y2 in full-resolution pixels. Full-resolution mask of box n is rows
    ``int(y1):int(y2 + 1)`` and columns ``int(x1):int(x2 + 1)`` (truncation; coordinates below 0 clip to 0),
    sampled at ``[s//2::s, s//2::s]``. ``y2 + 1`` is evaluated in the boxes' dtype, as the reference does.
    Returns (N,h,w) with h = ceil((height - s//2) / s), in the boxes' floating dtype (float32 for integer boxes).
    """
    boxes = torch.as_tensor(boxes)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"box_bitmasks: boxes must be (N,4) x1,y1,x2,y2, got shape {tuple(boxes.shape)}")
    if stride < 1 or height < 1 or width < 1:
        raise ValueError(f"box_bitmasks: need stride, height, width >= 1; got {stride}, {height}, {width}")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    start = stride // 2
    ys = torch.arange(start, height, stride, device=boxes.device)
    xs = torch.arange(start, width, stride, device=boxes.device)
    y_lo, y_hi = torch.trunc(boxes[:, 1]).clamp(min=0), torch.trunc(boxes[:, 3] + 1)
    x_lo, x_hi = torch.trunc(boxes[:, 0]).clamp(min=0), torch.trunc(boxes[:, 2] + 1)
    in_y = (ys >= y_lo[:, None]) & (ys < y_hi[:, None])
    in_x = (xs >= x_lo[:, None]) & (xs < x_hi[:, None])
    return (in_y[:, :, None] & in_x[:, None, :]).to(boxes.dtype)


def dice_coefficient(x: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BoxInst's per-instance Dice loss 1 - 2 sum(x t) / (sum(x^2) + sum(t^2) + eps).

    x, target: (N, ...) -> (N,).
    """
    x = x.reshape(x.shape[0], -1)
    target = target.reshape(target.shape[0], -1).to(x.dtype)
    union = (x * x).sum(1) + (target * target).sum(1) + eps
    return 1.0 - 2.0 * (x * target).sum(1) / union


def dice_loss(x: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """DiscoBox's per-instance Dice loss 1 - 2 sum(x t) / ((sum(x^2) + eps) + (sum(t^2) + eps)).

    x, target: (N, ...) -> (N,). Note eps is added to each squared sum (BoxInst adds 1e-5 once).
    """
    x = x.reshape(x.shape[0], -1)
    target = target.reshape(target.shape[0], -1).to(x.dtype)
    return 1.0 - 2.0 * (x * target).sum(1) / (((x * x).sum(1) + eps) + ((target * target).sum(1) + eps))


def mil_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DiscoBox's projection (MIL) term: Dice of the column maxima plus Dice of the row maxima.

    prob: (N,H,W) probabilities, target: (N,H,W) box masks -> (N,).
    """
    if prob.dim() != 3 or prob.shape != target.shape:
        raise ValueError(f"mil_loss: prob and target must both be (N,H,W), got {tuple(prob.shape)} and "
                         f"{tuple(target.shape)}")
    target = target.to(prob.dtype)
    return (dice_loss(prob.amax(2), target.amax(2)) + dice_loss(prob.amax(1), target.amax(1)))


def projection_loss(mask_logits: torch.Tensor, box_masks: torch.Tensor) -> torch.Tensor:
    """BoxInst projection loss: mean over instances of Dice(max_y) + Dice(max_x) of sigmoid(logits) vs the box.

    mask_logits: (N,1,h,w); box_masks: (N,1,h,w) (bool / 0-1). Returns a scalar (0 for N = 0).
    """
    check_logits(mask_logits, "projection_loss", box_masks)
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    scores = mask_logits.sigmoid()
    box_masks = box_masks.to(scores.dtype)
    loss_y = dice_coefficient(scores.amax(2), box_masks.amax(2))
    loss_x = dice_coefficient(scores.amax(3), box_masks.amax(3))
    return (loss_x + loss_y).mean()


def color_edges(color_sim: torch.Tensor, box_masks: torch.Tensor, thresh: float = 0.3) -> torch.Tensor:
    """BoxInst colour edge set: similarity >= thresh and the **centre** pixel inside the box.

    color_sim: (8,h,w), (1,8,h,w) or (N,8,h,w); box_masks: (N,1,h,w). Returns (N,8,h,w) bool.
    """
    if color_sim.dim() == 3:
        color_sim = color_sim[None]
    if color_sim.dim() != 4 or color_sim.shape[1] != 8:
        raise ValueError(f"color_edges: color_sim must be (1|N,8,h,w), got {tuple(color_sim.shape)}")
    if box_masks.dim() != 4 or box_masks.shape[1] != 1 or box_masks.shape[2:] != color_sim.shape[2:]:
        raise ValueError(f"color_edges: box_masks must be (N,1,{color_sim.shape[2]},{color_sim.shape[3]}), got "
                         f"{tuple(box_masks.shape)}")
    if color_sim.shape[0] not in (1, box_masks.shape[0]):
        raise ValueError(f"color_edges: color_sim batch {color_sim.shape[0]} is neither 1 nor N={box_masks.shape[0]}")
    return (color_sim >= thresh) & box_masks.bool()


def depth_gradient_diff(depth: torch.Tensor, dilation: int = 2) -> torch.Tensor:
    """AsyInst Eq. 1: Diff(e) = |d_p + d_p2 - 2 d_p1| for the edge (p, p2 = p + d v), p1 = p + (d/2) v.

    depth: (H,W) metric depth, 0 (or non-finite) = invalid. Returns (8,H,W) in depth's dtype, **inf** where the
    edge is invalid (p, p1 or p2 outside the image or without valid depth). ``dilation`` must be even.
    """
    if depth.dim() != 2:
        raise ValueError(f"depth_gradient_diff: depth must be (H,W), got shape {tuple(depth.shape)}")
    return _gradient_diff(depth, dilation)


def _gradient_diff(depth: torch.Tensor, dilation: int) -> torch.Tensor:
    """``depth_gradient_diff`` over leading batch dimensions: (..., H, W) -> (..., 8, H, W)."""
    if dilation < 2 or dilation % 2:
        raise ValueError(f"depth_gradient_diff: dilation must be even and >= 2 (p1 is the midpoint), got {dilation}")
    if not depth.is_floating_point():
        depth = depth.float()
    height, width = depth.shape[-2:]
    valid = torch.isfinite(depth) & (depth > 0)
    diff = torch.full((*depth.shape[:-2], 8, height, width), float("inf"), dtype=depth.dtype, device=depth.device)
    for e, (dy, dx) in enumerate(neighbour_offsets(dilation)):
        ys, ye = max(0, -dy), min(height, height - dy)
        xs, xe = max(0, -dx), min(width, width - dx)
        if ys >= ye or xs >= xe:
            continue
        hy, hx = dy // 2, dx // 2
        p = (..., slice(ys, ye), slice(xs, xe))
        p1 = (..., slice(ys + hy, ye + hy), slice(xs + hx, xe + hx))
        p2 = (..., slice(ys + dy, ye + dy), slice(xs + dx, xe + dx))
        d = (depth[p] + depth[p2] - 2 * depth[p1]).abs()
        ok = valid[p] & valid[p1] & valid[p2]
        diff[..., e, ys:ye, xs:xe] = torch.where(ok, d, diff[..., e, ys:ye, xs:xe])
    return diff


def depth_edges(depth: torch.Tensor, box_masks: torch.Tensor, thresh: float = 0.01, dilation: int = 2) -> torch.Tensor:
    """AsyInst depth-gradient edge set (Eq. 3 / 12): valid edges with Diff <= thresh and p or p2 in the box.

    depth: (H,W) shared by all N masks, or (N,H,W) one map per mask (RoI crops); box_masks: (N,1,H,W).
    Returns (N,8,H,W) bool.
    """
    if box_masks.dim() != 4 or box_masks.shape[1] != 1 or tuple(box_masks.shape[2:]) != tuple(depth.shape[-2:]):
        raise ValueError(f"depth_edges: box_masks must be (N,1,H,W) with (H,W) = {tuple(depth.shape[-2:])}, got "
                         f"{tuple(box_masks.shape)}")
    if depth.dim() == 3 and depth.shape[0] != box_masks.shape[0]:
        raise ValueError(f"depth_edges: {depth.shape[0]} depth maps for {box_masks.shape[0]} box masks")
    if depth.dim() not in (2, 3):
        raise ValueError(f"depth_edges: depth must be (H,W) or (N,H,W), got shape {tuple(depth.shape)}")
    close = _gradient_diff(depth, dilation) <= thresh  # inf (invalid) compares False
    if close.dim() == 3:
        close = close[None]
    inside = box_masks[:, 0].bool().to(close.device)
    height, width = close.shape[-2:]
    far_inside = torch.zeros((inside.shape[0], 8, height, width), dtype=torch.bool, device=close.device)
    for e, (dy, dx) in enumerate(neighbour_offsets(dilation)):
        ys, ye = max(0, -dy), min(height, height - dy)
        xs, xe = max(0, -dx), min(width, width - dx)
        if ys < ye and xs < xe:
            far_inside[:, e, ys:ye, xs:xe] = inside[:, ys + dy:ye + dy, xs + dx:xe + dx]
    return close & (inside[:, None] | far_inside)


def check_logits(mask_logits: torch.Tensor, where: str, box_masks: torch.Tensor | None = None) -> None:
    """Raise ValueError naming ``where`` unless mask_logits is a floating-point (N,1,h,w) tensor and, when given,
    box_masks has its shape."""
    if mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
        raise ValueError(f"{where}: mask_logits must be (N,1,h,w), got shape {tuple(mask_logits.shape)}")
    if not mask_logits.is_floating_point():
        raise ValueError(f"{where}: mask_logits must be floating point, got {mask_logits.dtype}")
    if box_masks is not None and box_masks.shape != mask_logits.shape:
        raise ValueError(f"{where}: box_masks shape {tuple(box_masks.shape)} != mask_logits shape "
                         f"{tuple(mask_logits.shape)}")


def _to_float(weights: torch.Tensor, dtype: torch.dtype, copy: bool = False) -> torch.Tensor:
    """Edge weights as ``dtype``; bool goes through uint8, whose CPU conversion is vectorised."""
    if weights.dtype == torch.bool:
        weights = weights.view(torch.uint8)
    return weights.to(dtype, copy=copy)


def _shifted(padded: torch.Tensor, offsets, pad: int, height: int, width: int) -> torch.Tensor:
    """padded (..., h + 2 pad, w + 2 pad) -> (..., D, h, w): the value at p + offset for each of the D offsets."""
    return torch.stack([padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width] for dy, dx in offsets], -3)


def _affinity_block(a: torch.Tensor, weights: torch.Tensor, gamma: float, dilation: int, need_grad: bool):
    """Un-normalised asymmetric affinity loss of one block, with its closed-form gradient.

    a: (M,h,w) shifted logits y - delta; weights: (M,8,h,w) edge weights (bool or float).
    Returns (S, count, G) with S = sum_e c_e exp(gamma P_e) log P_e (a 0-d tensor), count = sum_e c_e over
    in-image edges, and G (M,h,w) = dS/da (None unless need_grad).

    Each unordered pixel pair (p, q = p + o) is evaluated once, for the 4 offsets o of ``_PAIR_DIRECTIONS`` stacked
    into one (M,4,h,w) batch; its multiplicity c is the weight of the edge from either end (0 when q is outside
    the image, which the zero padding of the far-end quantities makes harmless).
    With u = logsigmoid(a), v = logsigmoid(-a): log P = logaddexp(u_p + u_q, v_p + v_q) (the reference's form);
    since log P = softplus(a_p + a_q) - softplus(a_p) - softplus(a_q), d log P / d a_p = sigma(a_p + a_q) - sigma(a_p):
    one sigmoid per pair, bounded, and no division by P (which underflows for strongly disagreeing logits).
    """
    m, height, width = a.shape
    pad = dilation
    offsets = [neighbour_offsets(dilation)[e] for e in _PAIR_DIRECTIONS]
    u = F.logsigmoid(a)
    v = F.logsigmoid(-a)
    per_pixel = [u, v] + ([a, torch.sigmoid(a)] if need_grad else [])
    far = _shifted(F.pad(torch.stack(per_pixel), (pad,) * 4), offsets, pad, height, width)  # (K,M,4,h,w)

    # c = w_e(p) [q inside] + w_{7-e}(q): forward edges leaving the image are dropped, reverse ones padded with 0.
    count_fwd = _to_float(weights[:, 4:], a.dtype, copy=True)
    for i, (dy, dx) in enumerate(offsets):
        if dy > 0:
            count_fwd[:, i, height - dy:] = 0
        if dx > 0:
            count_fwd[:, i, :, width - dx:] = 0
        elif dx < 0:
            count_fwd[:, i, :, :-dx] = 0
    reverse = F.pad(_to_float(weights[:, :4].flip(1), a.dtype), (pad,) * 4)
    c = count_fwd + torch.stack([reverse[:, i, pad + dy:pad + dy + height, pad + dx:pad + dx + width]
                                 for i, (dy, dx) in enumerate(offsets)], 1)

    log_p = torch.logaddexp(u[:, None] + far[0], v[:, None] + far[1])
    if gamma:
        prob = log_p.exp()
        cw = c * torch.exp(gamma * prob)
    else:
        cw = c
    total = (cw * log_p).sum()
    count = c.sum()
    if not need_grad:
        return total, count, None
    g = cw * (gamma * prob * log_p + 1.0) if gamma else cw
    sig_s = torch.sigmoid(a[:, None] + far[2])
    grad_p = (g * (sig_s - per_pixel[3][:, None])).sum(1)
    grad_q = g * (sig_s - far[3])
    grad = F.pad(grad_p, (pad,) * 4)
    for i, (dy, dx) in enumerate(offsets):
        grad[:, pad + dy:pad + dy + height, pad + dx:pad + dx + width] += grad_q[:, i]
    return total, count, grad[:, pad:pad + height, pad:pad + width]


def _edge_regions(weights: torch.Tensor, dilation: int) -> list[tuple[int, int, int, int] | None]:
    """Per instance, the rectangle (y0, y1, x0, x1) holding both ends of all its edges (None if it has none)."""
    _, _, height, width = weights.shape
    # uint8 max-reductions: bool ``any`` / ``ne`` are unvectorised on CPU and cost 100x more here.
    flags = weights.view(torch.uint8) if weights.dtype == torch.bool else weights.ne(0).view(torch.uint8)
    rows, cols = flags.amax(3).amax(1), flags.amax(2).amax(1)  # (N,h), (N,w)
    first_row, last_row = rows.argmax(1), height - 1 - rows.flip(1).argmax(1)
    first_col, last_col = cols.argmax(1), width - 1 - cols.flip(1).argmax(1)
    table = torch.stack((rows.amax(1).long(), first_row, last_row, first_col, last_col), 1).tolist()
    return [(max(0, y0 - dilation), min(height, y1 + dilation + 1), max(0, x0 - dilation), min(width, x1 + dilation + 1))
            if has else None for has, y0, y1, x0, x1 in table]


# Per-block fixed cost (Python + op dispatch) expressed in elements, to decide between per-instance crops and one
# batched block over the union of the crops.
_BLOCK_OVERHEAD_ELEMS = 8192


class _AsymmetricAffinityLoss(torch.autograd.Function):
    """Forward computes the loss and its gradient together (closed form); backward only rescales the gradient."""

    @staticmethod
    def forward(ctx, logits, weights, delta, gamma, dilation):
        a = logits[:, 0] - delta
        need_grad = ctx.needs_input_grad[0]
        regions = _edge_regions(weights, dilation)
        live = [n for n, r in enumerate(regions) if r is not None]
        total = a.new_zeros(())
        count = a.new_zeros(())
        grad = torch.zeros_like(a) if need_grad else None
        if live:
            y0 = min(regions[n][0] for n in live)
            y1 = max(regions[n][1] for n in live)
            x0 = min(regions[n][2] for n in live)
            x1 = max(regions[n][3] for n in live)
            crops = sum((r[1] - r[0]) * (r[3] - r[2]) + _BLOCK_OVERHEAD_ELEMS for r in map(regions.__getitem__, live))
            if crops < len(live) * (y1 - y0) * (x1 - x0):
                blocks = [(slice(n, n + 1), regions[n]) for n in live]
            else:
                index = torch.tensor(live, device=a.device) if len(live) < a.shape[0] else slice(None)
                blocks = [(index, (y0, y1, x0, x1))]
            for index, (by0, by1, bx0, bx1) in blocks:
                s, c, g = _affinity_block(a[index, by0:by1, bx0:bx1], weights[index, :, by0:by1, bx0:bx1],
                                          gamma, dilation, need_grad)
                total, count = total + s, count + c
                if need_grad:
                    grad[index, by0:by1, bx0:bx1] += g
        scale = -math.exp(-0.5 * gamma) / count.clamp(min=1.0)
        if need_grad:
            ctx.save_for_backward(grad * scale)
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad_output * grad)[:, None], None, None, None, None


def asymmetric_affinity_loss(mask_logits: torch.Tensor, edges: torch.Tensor, delta: float = 0.0,
                             gamma: float = 0.0, dilation: int = 2) -> torch.Tensor:
    """AsyInst asymmetric affinity loss (Eq. 9-11) over a given edge set, normalised over all instances together.

    P_e = s(y_p - delta) s(y_q - delta) + s(-y_p + delta) s(-y_q + delta) (in log space),
    loss = -(1 / max(N, 1)) sum_e exp(gamma (P_e - 0.5)) log P_e, N = number (total weight) of edges.
    delta = gamma = 0 is BoxInst's pairwise loss. The modulating factor is differentiated (not detached).

    mask_logits: (N,1,h,w) float32/float64, any device; edges: (N,8,h,w) bool (or 0/1 float weights), the edge
    from (y,x) to (y,x) + offset_e (module docstring). Edges whose far end falls outside the image have no pair and
    are ignored (neither summed nor counted). Returns a scalar; the gradient is a closed form computed with the
    loss, so the whole thing costs one pass over each pixel pair within the instances' edge regions. First-order
    only: a second backward (double backward, e.g. a gradient penalty) raises torch's once_differentiable error.
    """
    check_logits(mask_logits, "asymmetric_affinity_loss")
    n, _, height, width = mask_logits.shape
    if tuple(edges.shape) != (n, 8, height, width):
        raise ValueError(f"asymmetric_affinity_loss: edges must be ({n},8,{height},{width}), got {tuple(edges.shape)}")
    if dilation < 1:
        raise ValueError(f"asymmetric_affinity_loss: dilation must be >= 1, got {dilation}")
    if edges.device != mask_logits.device:
        raise ValueError(f"asymmetric_affinity_loss: edges on {edges.device} but mask_logits on {mask_logits.device}")
    return _AsymmetricAffinityLoss.apply(mask_logits, edges, float(delta), float(gamma), int(dilation))


def warmup_weight(iteration: int, warmup_iters: int, final: float) -> float:
    """Linear warm-up of a loss weight: final * min(iteration / warmup_iters, 1) (final when warmup_iters <= 0)."""
    if warmup_iters <= 0:
        return float(final)
    return float(final) * min(max(iteration, 0) / warmup_iters, 1.0)


def mask_loss(mask_logits: torch.Tensor, box_masks: torch.Tensor, color_edge_set: torch.Tensor | None = None,
              depth_edge_set: torch.Tensor | None = None, cfg: ObjectiveConfig | None = None,
              iteration: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AsyInst Eq. 13: L_mask = L_proj + lambda_c L_color + lambda_d L_depth, each term also returned alone.

    mask_logits, box_masks: (N,1,h,w); color_edge_set / depth_edge_set: (N,8,h,w) edge sets (``color_edges`` /
    ``depth_edges``) or None to drop the term (its entry is then 0). The colour and depth terms use
    (delta, gamma) = (cfg.delta_color, cfg.gamma_color) and (cfg.delta_depth, cfg.gamma_depth).
    iteration: training iteration for the linear warm-up of the lambdas (None = fully warmed up).
    Returns (total, {"proj", "color", "depth"}: the unweighted terms, "lambda_color", "lambda_depth": the weights
    used, as 0-d tensors}).
    """
    cfg = cfg or ObjectiveConfig()
    dil = cfg.pairwise_dilation
    zero = mask_logits.sum() * 0.0
    proj = projection_loss(mask_logits, box_masks)
    color = (asymmetric_affinity_loss(mask_logits, color_edge_set, cfg.delta_color, cfg.gamma_color, dil)
             if color_edge_set is not None else zero)
    depth = (asymmetric_affinity_loss(mask_logits, depth_edge_set, cfg.delta_depth, cfg.gamma_depth, dil)
             if depth_edge_set is not None else zero)
    if iteration is None:
        lam_c, lam_d = cfg.lambda_color, cfg.lambda_depth
    else:
        lam_c = warmup_weight(iteration, cfg.warmup_iters, cfg.lambda_color)
        lam_d = warmup_weight(iteration, cfg.warmup_iters, cfg.lambda_depth)
    total = proj + lam_c * color + lam_d * depth
    terms = {"proj": proj, "color": color, "depth": depth,
             "lambda_color": torch.as_tensor(lam_c), "lambda_depth": torch.as_tensor(lam_d)}
    return total, terms
