"""Mask R-CNN RoI heads trained from boxes: torchvision's box branch and losses, our mask branch.

In training, each image's target holds (after ``PixelAlignedTransform``):

==================  =====================================================================================
key                 value
==================  =====================================================================================
boxes, labels       (N,4) float, (N,) int64 contiguous labels 1..K (torchvision's)
rgb                 (3,h,w) float [0,255]: the transformed image (colour affinity)
depth               optional (h,w) float metres, 0 = invalid (depth affinity)
pseudo_masks        optional (N,h,w) float [0,1]; with ``pseudo_weight`` (N,) the row's score, 0 = no label
image_id            str; ``instance_ids`` (N,) int64; ``flipped`` bool; ``queue_ok`` (N,) bool (box not cut
                    by a crop, so its features may enter the queue)
correspondences     optional list (len N) of lists of ``(partner_key, grid, src, dst, weight)``
==================  =====================================================================================

Mask losses per positive proposal (at most ``mask_rois_per_image`` per image, sampled at random, to bound the
per-step cost): the box term against the matched box (``cfg.projection``: the projection Dice, a log loss on
the same projections, or both), asymmetric colour and depth affinity at their full weights (the training loop
warms them up: ``student.schedule.loss_scales``), L_con where the matched instance has a pseudo mask and L_nce
where it has correspondences whose partners are in the feature queue. The heads hold one piece of state, that
queue: L_nce stages this batch's instance features in it, and the training loop commits them once the step is
taken (a step dropped for a non-finite loss leaves the queue as it was).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from teacher.affinity import projection_loss

from .config import StudentConfig
from .feature_queue import FeatureQueue
from .losses import (color_term, consistency_loss, dense_nce_loss, depth_term, projection_bce_loss, roi_box_masks,
                     roi_depth, roi_in_image, roi_sample)

LOSS_TERMS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_proj", "loss_color",
              "loss_depth", "loss_con", "loss_nce")


# The box term of the mask loss (``StudentConfig.projection``): logits (P,1,M,M), box masks (P,1,M,M) -> scalar.
PROJECTIONS = {
    "dice": projection_loss,
    "bce": projection_bce_loss,
    "dice+bce": lambda logits, boxes: projection_loss(logits, boxes) + projection_bce_loss(logits, boxes),
}


def context_rois(boxes: torch.Tensor, scale: list[float], image_shape: tuple[int, int]) -> torch.Tensor:
    """One RoI per box, grown by a random factor in [scale[0], scale[1]] per side length and shifted by up to a
    tenth of the box size, clipped to the image: boxes (N,4) -> (N,4). Empty when ``scale`` is empty."""
    if not scale or len(boxes) == 0:
        return boxes.new_zeros((0, 4))
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + (torch.rand_like(wh) - 0.5) * 0.2 * wh
    size = wh * (scale[0] + torch.rand_like(wh) * (scale[-1] - scale[0]))
    h, w = image_shape
    limit = boxes.new_tensor([w, h, w, h])
    return torch.minimum(torch.cat([centre - size / 2, centre + size / 2], 1).clamp(min=0), limit)


class BoxSupervisedRoIHeads(RoIHeads):
    def __init__(self, *args, cfg: StudentConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.cfg = cfg
        self.queue = FeatureQueue(cfg.queue_size)

    def check_targets(self, targets):
        # torchvision demands target["masks"] when the model has a mask head; ours trains without them.
        if targets is None or not all("boxes" in t and "labels" in t for t in targets):
            raise ValueError("every target needs 'boxes' and 'labels'")

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, None)
        self.check_targets(targets)
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        losses.update(self.mask_losses(features, proposals, matched_idxs, labels, image_shapes, targets))
        return [], losses

    def _positives(self, proposals, matched_idxs, labels, targets, image_shapes):
        """Per image: (rois (P_i,4), matched instance index (P_i,)): positive proposals capped at
        ``mask_rois_per_image``, plus one context RoI per box (``context_rois``)."""
        cap = self.cfg.mask_rois_per_image
        out = []
        for props, midx, lab, t, shape in zip(proposals, matched_idxs, labels, targets, image_shapes):
            pos = torch.where(lab > 0)[0]
            if cap > 0 and len(pos) > cap:
                pos = pos[torch.randperm(len(pos), device=pos.device)[:cap]]
            ctx = context_rois(t["boxes"], self.cfg.context_scale, shape)
            out.append((torch.cat([props[pos], ctx]),
                        torch.cat([midx[pos], torch.arange(len(ctx), device=midx.device)])))
        return out

    def mask_losses(self, features, proposals, matched_idxs, labels, image_shapes, targets) -> dict[str, torch.Tensor]:
        positives = self._positives(proposals, matched_idxs, labels, targets, image_shapes)
        rois = [r for r, _ in positives]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, rois, image_shapes)))
        gt_labels = torch.cat([t["labels"][m] for t, (_, m) in zip(targets, positives)])
        logits = mask_logits[torch.arange(len(gt_labels), device=gt_labels.device), gt_labels][:, None]
        # The losses run in float32 even under AMP: an edge count in float16 overflows past 65504 edges.
        with torch.autocast(logits.device.type, enabled=False):
            return self._mask_terms(logits.float(), features, positives, image_shapes, targets)

    def _mask_terms(self, logits, features, positives, image_shapes, targets) -> dict[str, torch.Tensor]:
        cfg, obj = self.cfg, self.cfg.objectives
        rois = [r for r, _ in positives]
        size = logits.shape[-1]
        zero = logits.sum() * 0.0

        all_rois = torch.cat(rois) if rois else logits.new_zeros((0, 4))
        gt_boxes = torch.cat([t["boxes"][m] for t, (_, m) in zip(targets, positives)])
        inside = roi_box_masks(all_rois, gt_boxes, size)

        # Per-RoI samples of every image; an image without depth gets depth 0 (invalid: no depth edge) and one
        # without pseudo masks weight 0 (no L_con), so one call per term covers the batch.
        rgb, valid, depth, pseudo, weight = [], [], [], [], []
        for t, (r, m), (h, w) in zip(targets, positives, image_shapes):
            rgb.append(roi_sample(t["rgb"][None], r, size))
            valid.append(roi_in_image(r, h, w, size))
            depth.append(roi_depth(t["depth"], r, size) if "depth" in t else r.new_zeros((len(r), 1, size, size)))
            if "pseudo_masks" in t:
                pseudo.append(roi_sample(t["pseudo_masks"][:, None], r, size, index=m))
                weight.append(t["pseudo_weight"][m])
            else:
                pseudo.append(r.new_zeros((len(r), 1, size, size)))
                weight.append(r.new_zeros(len(r)))
        weight = torch.cat(weight)

        losses = {"loss_proj": PROJECTIONS[cfg.projection](logits, inside)}
        lam_c, lam_d = obj.lambda_color, obj.lambda_depth
        losses["loss_color"] = (lam_c * color_term(logits, torch.cat(rgb), torch.cat(valid), inside, obj)
                                if len(logits) and lam_c > 0 else zero)
        with_depth = any("depth" in t for t in targets)
        losses["loss_depth"] = (lam_d * depth_term(logits, torch.cat(depth), inside, obj)
                                if len(logits) and with_depth and lam_d > 0 else zero)
        has = weight > 0
        losses["loss_con"] = (cfg.alpha_con * consistency_loss(logits[has], torch.cat(pseudo)[has], weight[has])
                              if has.any() and cfg.alpha_con > 0 else zero)
        with_shards = any("correspondences" in t for t in targets)  # boxes only: no queue to keep
        losses["loss_nce"] = cfg.alpha_nce * self.nce(features, image_shapes, targets) \
            if cfg.alpha_nce > 0 and with_shards else zero
        return {k: v + zero for k, v in losses.items()}

    def instance_features(self, features, boxes, image_shapes) -> torch.Tensor:
        """Mask-head features over the boxes grown by ``correspondence_pad`` (the teacher's RoI, where the shards'
        cells lie), pooled to the correspondence grid and L2-normalised over C: (sum N_i, C, g, g)."""
        pad = self.cfg.correspondence_pad
        grown = [torch.cat([b[:, :2] - pad * (b[:, 2:] - b[:, :2]), b[:, 2:] + pad * (b[:, 2:] - b[:, :2])], 1)
                 for b in boxes]
        x = self.mask_head(self.mask_roi_pool(features, grown, image_shapes))
        return F.normalize(F.adaptive_avg_pool2d(x, self.cfg.correspondence_grid), dim=1).float()

    def nce(self, features, image_shapes, targets) -> torch.Tensor:
        """L_nce over the targets' correspondences; this batch's instance features are staged in the queue."""
        grid = self.cfg.correspondence_grid
        feats = self.instance_features(features, [t["boxes"] for t in targets], image_shapes)
        per_image = feats.flatten(2).split([len(t["boxes"]) for t in targets])  # (N_i, C, G) each
        queries, keys, positives, weights = [], [], [], []
        for t, f in zip(targets, per_image):
            for i, row in enumerate(t.get("correspondences") or []):
                for partner, g, src, dst, w in row:
                    stored = self.queue.get(partner)
                    if g != grid or stored is None or stored.shape[1] != grid * grid or len(src) == 0:
                        continue
                    queries.append(f[i][:, src.to(f.device)].T)
                    keys.append(stored.to(f.device).T[None].expand(len(src), -1, -1))
                    positives.append(dst.to(f.device))
                    weights.append(w.to(f.device))
        if queries:
            loss = dense_nce_loss(torch.cat(queries), torch.cat(keys), torch.cat(positives), torch.cat(weights),
                                  self.cfg.nce_temperature)
        else:
            loss = feats.sum() * 0.0
        g = self.cfg.correspondence_grid
        for t, f in zip(targets, per_image):
            f = f.detach().unflatten(-1, (g, g))
            if t.get("flipped"):
                f = f.flip(-1)  # the queue keeps the unflipped orientation the shards' cells refer to
            ok = t.get("queue_ok")
            for i in range(len(f)):
                if ok is None or bool(ok[i]):
                    self.queue.stage((t["image_id"], int(t["instance_ids"][i])), f[i].flatten(1).cpu())
        return loss
