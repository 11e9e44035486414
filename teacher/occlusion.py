"""Joint resolution of overlapping boxes (DESIGN section 4, step 7): each pixel to at most one instance.

The per-box pipeline labels every box on its own, so where boxes overlap both masks claim the same pixels, and an
occluded object's mask takes in its occluder. After refinement, the instances of one image are resolved together
on the *contested* pixels: those inside two or more boxes that at least one of those instances' own masks claims
(a pixel no one claims stays background). At full resolution, over the instances whose box holds the pixel:

    U_k(p) = w_l * logit P_k(p)                the instance's own refined probability
           + w_c * colour_k(p)                 which instance's colour model explains p better
           + w_r * centre_k(p)                 how near p lies to the centre of k's box
           + w_z * depth_k(p)                  which instance's depth explains p's depth (only with depth)
           + sum_{j's box holds p} order_kj    pairwise "k is in front of j" evidence

(each per-pixel cue centred over the instances whose box holds p), and a multi-label mean-field with the CRF's
colour Potts kernel (8-neighbourhood, `kernels.message_passing`) updates the contested pixels; every other pixel
keeps its own label and acts as a fixed neighbour. A contested pixel stays with the arg-max instance if that
instance's own mask claimed it (``JointConfig.give_won`` also hands it over when it did not), and leaves every
other mask, so the rows of an image are disjoint.

order_kj is antisymmetric, from measured cues (`JointConfig` gives the weights and the measurements):
- depth, where both instances have it: the instance whose foreground median depth is nearer is in front;
- containment: the share of k's box inside j's minus the share of j's box inside k's (a box inside another is
  usually in front of it);
- the lower bottom edge, where depth is missing (street scenes: the nearer object stands lower in the image).

On large images (a contested rectangle over ``JointConfig.max_pixels``) the cues and the mean-field run on a grid
of every s-th pixel, and each other contested pixel takes its grid point's winner when that instance's box holds
it (else the instances' own log-odds decide), so the cost per image stays bounded.

Per-instance colour and depth models come from the RoI crops the teacher already has: the LAB histogram and the
median depth of the instance's foreground, counting only crop pixels no other box covers (the pixels that are
surely its own), or its whole foreground when those carry too little of it (a box inside another).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kernels.message_passing import message_passing, neighbour_offsets

from .box_prior import colour_bins, weighted_histograms
from .color import rgb_to_lab
from .config import JointConfig
from .crf import colour_potts_kernel
from .roi import RoIGrid, Window, threshold_windows

_LOGIT_CLAMP = 8.0
_OWN_SHARE = 0.1   # an instance's "own" pixels must weigh this share of its foreground to build its models alone


@dataclass
class Resolution:
    """Result of `resolve`: masks N (H,W) bool (disjoint); contested (N,) share of each instance's own
    (unresolved) mask that lay on pixels another instance claimed too; margin (N,) mean winning margin
    Q_win - Q_second over the contested pixels the instance claimed (0 where it lost them, 1 without any; on a
    grid of every s-th pixel, over the grid points); lost (N,) share of the mask in ``masks`` that another
    instance won: scoring per-box masks (`resolve` given ``masks``), the share of the per-box mask; resolved, 1 for
    an instance that lost every pixel and got its own mask back (``_restore``), 0 for every other."""

    masks: list[torch.Tensor]
    contested: torch.Tensor
    margin: torch.Tensor
    lost: torch.Tensor


def pair_overlaps(windows: list[Window]) -> np.ndarray:
    """(N,N) int64 pixel counts of the pairwise intersections of the windows' spans (diagonal 0)."""
    n = len(windows)
    span = np.array([[w.r0, w.r1, w.c0, w.c1] for w in windows], dtype=np.int64).reshape(n, 4)
    rows = np.minimum(span[:, None, 1], span[None, :, 1]) - np.maximum(span[:, None, 0], span[None, :, 0]) + 1
    cols = np.minimum(span[:, None, 3], span[None, :, 3]) - np.maximum(span[:, None, 2], span[None, :, 2]) + 1
    inter = rows.clip(min=0) * cols.clip(min=0)
    np.fill_diagonal(inter, 0)
    return inter


def order_evidence(boxes: torch.Tensor, depth_median: torch.Tensor | None, cfg: JointConfig) -> torch.Tensor:
    """Pairwise front-of evidence O (N,N), antisymmetric: O[k, j] > 0 means k is in front of j.

    boxes (N,4) x1,y1,x2,y2; depth_median (N,) metres of each instance's foreground (NaN where unknown) or None.
    O = w_contain * (share of k's box inside j's - share of j's inside k's)
      + w_depth * tanh((d_j - d_k) / (min(d_j, d_k) * depth_rel))   (0 where a depth is unknown)
      + w_bottom * clip((y2_k - y2_j) / max(h_k, h_j), -1, 1)          (only where a depth is unknown)
    """
    x1, y1, x2, y2 = boxes.unbind(1)
    area = ((x2 - x1) * (y2 - y1)).clamp(min=1e-6)
    iw = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None])).clamp(min=0)
    ih = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None])).clamp(min=0)
    share = iw * ih / area[:, None]                      # share[k, j]: of k's box inside j's
    order = cfg.containment_weight * (share - share.T)
    # Depth, where both instances have it, replaces the bottom-edge guess (toy train: the bottom edge on top of
    # depth lowered the mean IoU, without depth it raised it).
    both_depth = torch.zeros_like(share, dtype=torch.bool)
    if depth_median is not None and cfg.depth_order_weight:
        d = depth_median
        rel = (d[None] - d[:, None]) / (torch.minimum(d[:, None], d[None]).clamp(min=1e-6) * cfg.depth_rel)
        both_depth = torch.isfinite(rel)
        order = order + cfg.depth_order_weight * torch.nan_to_num(torch.tanh(rel), nan=0.0)
    if cfg.bottom_weight:
        h = y2 - y1
        lower = ((y2[:, None] - y2[None]) / torch.maximum(h[:, None], h[None]).clamp(min=1e-6)).clamp(-1, 1)
        order = order + cfg.bottom_weight * torch.where(both_depth, torch.zeros_like(lower), lower)
    order.fill_diagonal_(0)
    return order


def own_pixels(grid: RoIGrid, boxes: torch.Tensor) -> torch.Tensor:
    """(N,1,R,R) bool: crop pixels inside the instance's box and inside no other box of the image."""
    n = grid.u.shape[0]
    xs, ys = crop_centres(grid)
    # in_x[k, j, c]: crop column c of RoI k lies in box j's x range.
    in_x = (xs[:, None] >= boxes[None, :, 0:1]) & (xs[:, None] <= boxes[None, :, 2:3])
    in_y = (ys[:, None] >= boxes[None, :, 1:2]) & (ys[:, None] <= boxes[None, :, 3:4])
    other = ~torch.eye(n, dtype=torch.bool, device=boxes.device)
    covered = ((in_y[:, :, :, None] & in_x[:, :, None, :]) & other[:, :, None, None]).any(1)
    return grid.inside & ~covered[:, None]


def crop_centres(grid: RoIGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Image coordinates of the crop pixel centres: xs (N,R) of the columns and ys (N,R) of the rows."""
    r = grid.u.shape[1]
    frac = (torch.arange(r, dtype=torch.float32, device=grid.regions.device) + 0.5) / r
    reg = grid.regions
    return (reg[:, 0:1] + frac[None] * (reg[:, 2:3] - reg[:, 0:1]),
            reg[:, 1:2] + frac[None] * (reg[:, 3:4] - reg[:, 1:2]))


def owned_by_others(grid: RoIGrid, masks: list[torch.Tensor]) -> torch.Tensor:
    """(N,1,R,R) bool: crop pixels of RoI k whose image pixel another instance's (resolved) mask holds.

    masks: N (H,W) bool full-resolution masks, in RoI order (each True only inside its box, ``grid.boxes``).
    """
    n, r = grid.u.shape
    height, width = masks[0].shape
    xs, ys = crop_centres(grid)
    cols = xs.floor().long().clamp(0, width - 1)
    rows = ys.floor().long().clamp(0, height - 1)
    reg, boxes = grid.regions, grid.boxes
    # Only the boxes that reach into RoI k's padded region can own any of its pixels.
    reach = ((boxes[None, :, 0] < reg[:, None, 2]) & (boxes[None, :, 2] > reg[:, None, 0])
             & (boxes[None, :, 1] < reg[:, None, 3]) & (boxes[None, :, 3] > reg[:, None, 1]))
    reach &= ~torch.eye(n, dtype=torch.bool, device=reach.device)
    out = torch.zeros((n, r, r), dtype=torch.bool, device=masks[0].device)
    for k, j in torch.nonzero(reach).tolist():
        out[k] |= masks[j][rows[k][:, None], cols[k][None, :]]
    return out[:, None]


def instance_models(lab: torch.Tensor, prob: torch.Tensor, own: torch.Tensor, inside: torch.Tensor,
                    depth: torch.Tensor | None, depth_ok: torch.Tensor | None, bins: int, alpha: float
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-instance colour histograms (N, bins^3) and foreground median depths (N,) (NaN where unknown) or None.

    lab (N,3,R,R) LAB crops; prob (N,1,R,R) refined probabilities; own (N,1,R,R) bool from `own_pixels`;
    inside (N,1,R,R) bool; depth / depth_ok (N,1,R,R) crops or None. Own pixels are used when they carry at least
    `_OWN_SHARE` of the foreground, else the whole foreground inside the box.
    """
    fg_all = prob * inside
    fg_own = prob * own
    use_own = fg_own.flatten(1).sum(1) >= _OWN_SHARE * fg_all.flatten(1).sum(1).clamp(min=1e-6)
    weight = torch.where(use_own.view(-1, 1, 1, 1), fg_own, fg_all)
    hist = weighted_histograms(colour_bins(lab, bins), weight.flatten(1), bins**3, alpha)
    if depth is None or depth_ok is None:
        return hist, None
    med = []
    for k in range(prob.shape[0]):
        for region in ((own[k] if use_own[k] else inside[k]), inside[k]):
            sel = region & depth_ok[k] & (prob[k] >= 0.5)
            if sel.any():
                med.append(depth[k][sel].median())
                break
        else:
            med.append(depth.new_tensor(float("nan")))
    return hist, torch.stack(med)


def resolve(windows: list[Window], boxes: torch.Tensor, image: torch.Tensor, depth: torch.Tensor | None,
            hist: torch.Tensor, depth_median: torch.Tensor | None, cfg: JointConfig, lab_scale: float,
            thresh: float, masks: list[torch.Tensor] | None = None) -> Resolution:
    """Resolve the overlaps of one image's instances (module docstring).

    windows: N pasted probability windows (`Window`); boxes (N,4); image (H,W,3) uint8 or float RGB tensor;
    depth (H,W) metres (0 = invalid) or None; hist (N, bins^3) colour models and depth_median (N,) or None from
    `instance_models`; lab_scale: LAB units per unit of the Potts kernel's colour (`BoxPriorConfig.lab_scale`).

    masks: the N per-box masks (`threshold_windows` of ``windows``) to score against, left untouched: the
    decision is made for the score alone (``teacher.occlusion: off``) on a grid of at most ``cfg.max_pixels``
    points over the boxes' intersections (`_contested_grid`), and the shares are read off that grid (contested:
    the claimed contested points times the stride squared, over the own mask; lost: the share of those another
    instance won, times the contested share), without any full-resolution map. ``Resolution.masks`` is then
    ``masks`` as given.
    """
    height, width = image.shape[:2]
    n = len(windows)
    score_only = masks is not None
    if masks is None:
        masks = threshold_windows(windows, height, width, thresh)
    contested_share = torch.zeros(n, device=image.device)
    margin = torch.ones(n, device=image.device)
    lost = torch.zeros(n, device=image.device)
    found = _contested_grid(windows, masks, cfg.max_pixels) if score_only else _contested_region(windows, masks)
    if found is None:
        return Resolution(masks, contested_share, margin, lost)
    members, contested, rect = found[:3]
    # On a large contested rectangle only every s-th pixel gets the cues and the mean-field; the others follow
    # their grid point (s = 1 on images of a few hundred pixels a side). Scoring alone, the map is that grid.
    stride = found[3] if score_only else _stride(rect, cfg.max_pixels)
    cell = torch.nonzero(contested if score_only else contested[::stride, ::stride])
    gy, gx = cell[:, 0] * stride + rect[0], cell[:, 1] * stride + rect[2]
    covers, claims, logits = _claims(windows, members, gy, gx, thresh)
    members_t = torch.as_tensor(members, device=image.device)
    sub_depth = None if depth_median is None else depth_median[members_t]
    member_boxes = boxes[members_t].to(torch.float32)
    lab = rgb_to_lab(image[gy, gx].to(torch.float32)).T                                   # (3,G)
    d = None if depth is None else depth[gy, gx].to(torch.float32)
    cues = _pixel_cues(lab, d, gy, gx, covers, member_boxes, hist[members_t], sub_depth, cfg)
    order = order_evidence(member_boxes, sub_depth, cfg)
    unary = torch.where(covers, cfg.logit_weight * logits + cues + order @ covers.to(torch.float32),
                        torch.full_like(cues, float("-inf")))
    q = _meanfield(unary, gy, gx, rect, stride, [masks[i] for i in members], image, lab_scale, cfg)   # (K,G)
    top = q.topk(2, dim=0)
    winner, won_margin = top.indices[0], top.values[0] - top.values[1]
    if score_only:
        for slot, i in enumerate(members):
            grid_claimed = claims[slot]
            n_own = int((windows[i].prob >= thresh).sum())
            contested_share[i] = min(1.0, int(grid_claimed.sum()) * stride**2 / max(n_own, 1))
            if grid_claimed.any():
                won = grid_claimed & (winner == slot)
                margin[i] = float((won_margin * won).sum()) / int(grid_claimed.sum())
                lost[i] = contested_share[i] * (1 - int(won.sum()) / int(grid_claimed.sum()))
        return Resolution(masks, contested_share, margin, lost)
    winners = _winner_map(winner, cell, contested, rect, stride, [windows[i] for i in members])
    emptied = []
    for slot, i in enumerate(members):
        win = windows[i]
        rs, cs = _overlap_slices(win, rect)[0]
        part = masks[i][rect[0] : rect[1] + 1, rect[2] : rect[3] + 1][rs, cs]   # a view: updates write the mask
        cont = contested[rs, cs]
        claimed = part & cont
        wins = winners[rs, cs] == slot
        keep = wins & (claimed | cfg.give_won)
        n_claimed = int(claimed.sum())
        n_own = int((win.prob >= thresh).sum())
        contested_share[i] = n_claimed / max(n_own, 1)
        grid_claimed = claims[slot]
        if grid_claimed.any():
            margin[i] = float((won_margin * (grid_claimed & (winner == slot))).sum()) / int(grid_claimed.sum())
        part.copy_(torch.where(cont, keep, part))
        if n_own and n_own - n_claimed + int((keep & claimed).sum()) == 0:
            emptied.append(i)
    for i in emptied:
        _restore(masks, i, members, windows[i], thresh)
        lost[i] = 1.0
    return Resolution(masks, contested_share, margin, lost)


def _contested_region(windows: list[Window], masks: list[torch.Tensor]
                      ) -> tuple[np.ndarray, torch.Tensor, tuple[int, int, int, int]] | None:
    """The contested pixels: inside two or more boxes and claimed by at least one of those instances' masks
    (nobody's pixel stays background). Returns the instances whose box holds one of them (K,), the contested map
    (h,w) bool over their bounding rectangle (R0, R1, C0, C1), grown by one pixel for the messages; None when there
    are none."""
    height, width = masks[0].shape
    inter = pair_overlaps(windows)
    members = np.nonzero(inter.sum(1) > 0)[0]
    if len(members) == 0:
        return None
    # Every pixel inside two boxes lies in the bounding rectangle of the pairwise box intersections; counted over
    # that rectangle grown by a pixel, the contested map also covers the messages' one-pixel border.
    r0, r1, c0, c1 = _intersections_rect(windows, inter)
    E0, F0 = max(r0 - 1, 0), max(c0 - 1, 0)
    E1, F1 = min(r1 + 1, height - 1), min(c1 + 1, width - 1)
    area = (E0, E1, F0, F1)
    count = torch.zeros((E1 - E0 + 1, F1 - F0 + 1), dtype=torch.int32, device=masks[0].device)
    claimed_any = torch.zeros_like(count, dtype=torch.bool)
    for i in members:
        rs, cs = _overlap_slices(windows[i], area)[0]
        count[rs, cs] += 1
        claimed_any |= masks[i][E0 : E1 + 1, F0 : F1 + 1]
    contested = (count >= 2) & claimed_any
    pix = torch.nonzero(contested)
    if len(pix) == 0:
        return None
    (r0, c0), (r1, c1) = pix.min(0).values.tolist(), pix.max(0).values.tolist()
    rect = (max(E0 + r0 - 1, 0), min(E0 + r1 + 1, height - 1), max(F0 + c0 - 1, 0), min(F0 + c1 + 1, width - 1))
    contested = contested[rect[0] - E0 : rect[1] - E0 + 1, rect[2] - F0 : rect[3] - F0 + 1]
    holds = [bool(contested[_overlap_slices(windows[i], rect)[0]].any()) for i in members]
    return members[np.asarray(holds, dtype=bool)], contested, rect


def _contested_grid(windows: list[Window], masks: list[torch.Tensor], max_pixels: int
                    ) -> tuple[np.ndarray, torch.Tensor, tuple[int, int, int, int], int] | None:
    """`_contested_region` on a grid, for a decision that only scores: the pixels every s-th row and column of the
    pairwise box intersections' bounding rectangle (R0, R1, C0, C1), s the smallest stride that leaves at most
    ``max_pixels`` points, that lie inside two or more boxes and that some of those instances' masks claim. Returns
    the instances whose box holds one of them (K,), that map (h,w) bool over the grid, the rectangle and s; None
    when there are none. No full-resolution map is made."""
    inter = pair_overlaps(windows)
    members = np.nonzero(inter.sum(1) > 0)[0]
    if len(members) == 0:
        return None
    rect = _intersections_rect(windows, inter)
    step = _stride(rect, max_pixels)
    rows = torch.arange(rect[0], rect[1] + 1, step, device=masks[0].device)
    cols = torch.arange(rect[2], rect[3] + 1, step, device=masks[0].device)
    count = torch.zeros((len(rows), len(cols)), dtype=torch.int32, device=masks[0].device)
    claimed_any = torch.zeros_like(count, dtype=torch.bool)
    holds = []
    for i in members:
        w = windows[i]
        in_r = (rows >= w.r0) & (rows <= w.r1)
        in_c = (cols >= w.c0) & (cols <= w.c1)
        count += (in_r[:, None] & in_c[None, :]).to(torch.int32)
        claimed_any |= masks[i][rows[:, None], cols[None, :]]
        holds.append((in_r, in_c))
    contested = (count >= 2) & claimed_any
    keep = [bool((contested & (in_r[:, None] & in_c[None, :])).any()) for in_r, in_c in holds]
    if not any(keep):
        return None
    return members[np.asarray(keep, dtype=bool)], contested, rect, step


def _intersections_rect(windows: list[Window], inter: np.ndarray) -> tuple[int, int, int, int]:
    """The bounding rectangle (R0, R1, C0, C1, inclusive) of the pairwise intersections of the windows' spans;
    inter (N,N) from `pair_overlaps`, with at least one pair overlapping."""
    spans = np.array([[w.r0, w.r1, w.c0, w.c1] for w in windows])
    pairs = np.argwhere(np.triu(inter) > 0)
    a, b = spans[pairs[:, 0]], spans[pairs[:, 1]]
    (r0, c0), (r1, c1) = np.maximum(a, b)[:, [0, 2]].min(0), np.minimum(a, b)[:, [1, 3]].max(0)
    return int(r0), int(r1), int(c0), int(c1)


def _overlap_slices(win: Window, rect: tuple[int, int, int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where window ``win`` and rectangle rect (R0, R1, C0, C1) overlap: (rows, cols) slices into the rectangle and
    (rows, cols) slices into the window (empty slices where they do not overlap)."""
    R0, _, C0, _ = rect
    r0, r1 = max(win.r0, R0), min(win.r1, rect[1])
    c0, c1 = max(win.c0, C0), min(win.c1, rect[3])
    r1, c1 = max(r1, r0 - 1), max(c1, c0 - 1)
    return ((slice(r0 - R0, r1 - R0 + 1), slice(c0 - C0, c1 - C0 + 1)),
            (slice(r0 - win.r0, r1 - win.r0 + 1), slice(c0 - win.c0, c1 - win.c0 + 1)))


def _holds(span: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """(K,P) bool: pixel p (row ys[p], column xs[p]) lies in span k (r0, r1, c0, c1 inclusive; span (K,4))."""
    return ((ys[None] >= span[:, 0:1]) & (ys[None] <= span[:, 1:2])
            & (xs[None] >= span[:, 2:3]) & (xs[None] <= span[:, 3:4]))


def _claims(windows: list[Window], members: np.ndarray, ys: torch.Tensor, xs: torch.Tensor, thresh: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At the P pixels (ys, xs), for the K members: covers (K,P) bool (the box holds the pixel), claims (K,P) bool
    (the instance's own mask holds it) and its clamped log-odds (K,P) float32 (0 where not covered)."""
    spans = [[windows[i].r0, windows[i].r1, windows[i].c0, windows[i].c1] for i in members]
    covers = _holds(torch.as_tensor(spans, device=ys.device), ys, xs)
    claims = torch.zeros(covers.shape, dtype=torch.bool, device=ys.device)
    logits = torch.zeros(covers.shape, device=ys.device)
    for slot, i in enumerate(members):
        sel = torch.nonzero(covers[slot])[:, 0]
        win = windows[i]
        p = win.prob[ys[sel] - win.r0, xs[sel] - win.c0]
        claims[slot, sel] = p >= thresh
        logits[slot, sel] = torch.logit(p.clamp(1e-4, 1 - 1e-4))
    return covers, claims, logits.clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)


def _pixel_cues(lab: torch.Tensor, depth: torch.Tensor | None, ys: torch.Tensor, xs: torch.Tensor,
                covers: torch.Tensor, boxes: torch.Tensor, hist: torch.Tensor, depth_median: torch.Tensor | None,
                cfg: JointConfig) -> torch.Tensor:
    """Per-pixel cues (K,P) of K instances at P pixels (rows ys, columns xs), each centred over the instances whose
    box holds the pixel (covers (K,P) bool):

    colour: log h_k(c_p) of the instance's colour histogram (hist (K, bins^3); lab (3,P)), clipped to
    +-colour_clip after centring;
    centre: -(box-normalised radius of p in k's box (boxes (K,4))): a pixel near a box's centre is more likely that
    object's;
    depth: -|d_p / d_k - 1| / depth_rel clipped at -1 (depth (P,) metres, 0 = invalid; depth_median (K,)), 0 where
    p's or k's depth is unknown.
    """
    bins = round(hist.shape[1] ** (1 / 3))
    cells = colour_bins(lab[None, :, :, None], bins)[0]                                # (P,)
    cover_f = covers.to(torch.float32)
    cnt = cover_f.sum(0).clamp(min=1)

    def centred(x: torch.Tensor) -> torch.Tensor:
        return x - (x * cover_f).sum(0) / cnt

    cues = cfg.colour_weight * centred(hist.log()[:, cells]).clamp(-cfg.colour_clip, cfg.colour_clip)
    if cfg.centre_weight:
        cx, cy = (boxes[:, 0:1] + boxes[:, 2:3]) / 2, (boxes[:, 1:2] + boxes[:, 3:4]) / 2
        hw = ((boxes[:, 2:3] - boxes[:, 0:1]) / 2).clamp(min=1e-3)
        hh = ((boxes[:, 3:4] - boxes[:, 1:2]) / 2).clamp(min=1e-3)
        radius = (((xs[None] + 0.5 - cx) / hw) ** 2 + ((ys[None] + 0.5 - cy) / hh) ** 2).sqrt()
        cues = cues - cfg.centre_weight * centred(radius)
    if depth is not None and depth_median is not None and cfg.depth_pixel_weight:
        fit = -((depth[None] / depth_median[:, None].clamp(min=1e-6) - 1).abs() / cfg.depth_rel).clamp(max=1.0)
        known = (depth[None] > 0) & torch.isfinite(depth_median)[:, None]
        cues = cues + cfg.depth_pixel_weight * centred(torch.where(known, fit, torch.zeros_like(fit)))
    return cues


def _stride(rect: tuple[int, int, int, int], max_pixels: int) -> int:
    """The smallest stride s at which the rectangle (R0, R1, C0, C1), sampled every s pixels, has at most
    max_pixels points."""
    R0, R1, C0, C1 = rect
    return max(1, math.ceil(math.sqrt((R1 - R0 + 1) * (C1 - C0 + 1) / max(max_pixels, 1))))


def _winner_map(winner: torch.Tensor, cell: torch.Tensor, contested: torch.Tensor, rect: tuple[int, int, int, int],
                stride: int, windows: list[Window]) -> torch.Tensor:
    """(h,w) int16 over rect (R0, R1, C0, C1): the winning member's slot at every contested pixel (-1 elsewhere).

    winner (G,) slots of the contested grid points cell (G,2) (row, column on the grid of every ``stride``-th pixel
    of rect); contested (h,w) bool; windows: the K members' windows. Each pixel takes its grid point's winner when
    that instance's box holds it; where it does not, or its grid point is not contested, the instances' own
    pasted log-odds decide among those whose box holds the pixel. With stride 1 every contested pixel is a grid
    point whose winner's box holds it.
    """
    h, w = contested.shape
    none = torch.tensor(-1, dtype=torch.int16, device=winner.device)
    grid = torch.full((-(-h // stride), -(-w // stride)), -1, dtype=torch.int16, device=winner.device)
    grid[cell[:, 0], cell[:, 1]] = winner.to(torch.int16)
    if stride == 1:
        return torch.where(contested, grid, none)
    spread = grid[:, None, :, None].expand(-1, stride, -1, stride).reshape(grid.shape[0] * stride, -1)[:h, :w]
    held = torch.zeros_like(contested)
    best = torch.full((h, w), -1.0, device=winner.device)
    fallback = torch.full_like(spread, -1)
    for slot, win in enumerate(windows):
        (rs, cs), (ws_r, ws_c) = _overlap_slices(win, rect)
        held[rs, cs] |= spread[rs, cs] == slot
        odds = win.prob[ws_r, ws_c]
        better = odds > best[rs, cs]
        best[rs, cs] = torch.maximum(odds, best[rs, cs])
        fallback[rs, cs].masked_fill_(better, slot)
    return torch.where(contested, torch.where(held, spread, fallback), none)


def _meanfield(unary: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, rect: tuple[int, int, int, int],
               stride: int, masks: list[torch.Tensor], image: torch.Tensor, lab_scale: float, cfg: JointConfig
               ) -> torch.Tensor:
    """Multi-label mean-field over the contested grid points; returns their marginals Q (K,G).

    unary (K,G) logits at the G contested points of the grid of every ``stride``-th pixel of rect (R0, R1, C0, C1)
    (rows ys, columns xs; -inf where the instance's box does not hold the point); masks: the K instances' own (H,W)
    masks, the fixed labels of every other grid point (no label where no one claims); image (H,W,3) RGB. The
    messages are the CRF's colour Potts kernel on that grid (`kernels.message_passing`); with stride 1 this is the
    plain mean-field, iters updates of every contested pixel.
    """
    if cfg.iters <= 0 or cfg.w1 <= 0:
        return torch.softmax(unary, 0)
    R0, R1, C0, C1 = rect
    rows = torch.arange(R0, R1 + 1, stride, device=unary.device)
    cols = torch.arange(C0, C1 + 1, stride, device=unary.device)
    hc, wc = len(rows), len(cols)
    q = torch.stack([m[rows[:, None], cols[None, :]] for m in masks]).flatten(1).to(unary.dtype)   # (K,hc*wc)
    cell = torch.div(ys - R0, stride, rounding_mode="floor") * wc + torch.div(xs - C0, stride, rounding_mode="floor")
    colour = rgb_to_lab(image[rows[:, None], cols[None, :]].to(torch.float32)).permute(2, 0, 1)[None] / lab_scale
    kernel = colour_potts_kernel(colour, cfg.w1, cfg.zeta)
    offsets = neighbour_offsets(3, 1)
    q_p = torch.softmax(unary, 0)
    for _ in range(cfg.iters):
        q.index_copy_(1, cell, q_p)
        msg = message_passing(q.view(1, -1, hc, wc), kernel, offsets)[0].flatten(1)
        q_p = torch.softmax(unary + msg.index_select(1, cell), 0)
    return q_p


def _restore(masks: list[torch.Tensor], i: int, members: np.ndarray, win: Window, thresh: float) -> None:
    """Instance i lost every pixel: it gets back the pixels of its own mask (its claim is better than none), and
    they leave the other masks, so the rows stay disjoint."""
    box = (slice(win.r0, win.r1 + 1), slice(win.c0, win.c1 + 1))
    mine = win.prob >= thresh
    for j in members:
        if j != i:
            masks[j][box] &= ~mine
    masks[i].zero_()
    masks[i][box] = mine
