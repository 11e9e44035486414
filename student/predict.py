"""Inference of a trained student on one image: detections with full-resolution masks."""
from __future__ import annotations

import numpy as np
import torch


@torch.inference_mode()
def predict(model: torch.nn.Module, image: np.ndarray, class_ids: list[int], mask_thresh: float = 0.5) -> dict:
    """Run ``model`` (eval mode) on an (H,W,3) uint8 RGB image.

    Returns {"boxes": (K,4) float32 x1,y1,x2,y2 px, "scores": (K,) float32, "classes": (K,) int64 dataset category
    ids (``class_ids[label - 1]``), "masks": (K,H,W) bool (mask probability > mask_thresh)}.
    """
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0).to(device)
    out = model([x])[0]
    labels = out["labels"].cpu().numpy()
    ids = np.asarray(class_ids, np.int64)
    return {"boxes": out["boxes"].cpu().numpy().astype(np.float32),
            "scores": out["scores"].cpu().numpy().astype(np.float32),
            "classes": ids[labels - 1] if len(labels) else np.zeros(0, np.int64),
            "masks": (out["masks"][:, 0] > mask_thresh).cpu().numpy()}
