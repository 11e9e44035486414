"""torchvision's ``GeneralizedRCNNTransform`` (normalise, resize, batch) made safe for per-pixel targets.

The stock transform has two traps for a box-supervised student:

1. it resizes ``target["masks"]`` with nearest interpolation and casts them with ``.byte()``: soft pseudo masks
   would be truncated to 0 and scores lost. So ``masks`` is refused here; pseudo masks travel as
   ``pseudo_masks`` (float, resized bilinearly, never cast);
2. it resizes no other per-pixel target: depth or colour would stay at the input size while the image and boxes
   move. So every key of ``PIXEL_TARGETS`` is resized to exactly the image's new size, and the colour the mask
   losses use (``rgb``) is recovered from the transformed image itself, so it lines up by construction.

In training the data pipeline (``student.data``) already resized, flipped and cropped each image, so the resize
is skipped (``resize_in_training=False``, the default); at evaluation images are resized so their short side is
``test_size`` (capped by ``max_size``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# Per-pixel target -> interpolation. Depth is resampled nearest so invalid (0) pixels never blend into fake depths.
PIXEL_TARGETS = {"depth": "nearest", "pseudo_masks": "bilinear"}


def resize_plane(values: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (H,W) or (N,H,W) maps to ``size`` = (h, w), keeping dtype float. Returns (h,w) or (N,h,w)."""
    squeeze = values.dim() == 2
    x = values[None] if squeeze else values
    if x.shape[0] == 0:
        out = x.new_zeros((0, *size), dtype=torch.float32)
    else:
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        out = F.interpolate(x[None].float(), size=size, mode=mode, **kwargs)[0]
    return out[0] if squeeze else out


class PixelAlignedTransform(GeneralizedRCNNTransform):
    """See the module docstring. Targets may carry ``boxes`` (N,4), ``labels`` (N,), ``depth`` (H,W) float metres
    (0 = invalid) and ``pseudo_masks`` (N,H,W) float in [0,1]; after the transform each also holds ``rgb``
    (3,h,w) float in [0,255], the transformed image before normalisation, unpadded."""

    def __init__(self, min_size: int, max_size: int, test_size: int | None = None, resize_in_training: bool = False):
        super().__init__(min_size=test_size or min_size, max_size=max_size, image_mean=list(IMAGE_MEAN),
                         image_std=list(IMAGE_STD))
        self._skip_resize = not resize_in_training

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):
        if target is not None and "masks" in target:
            raise ValueError("PixelAlignedTransform: pass pseudo masks as target['pseudo_masks'] (float); "
                             "target['masks'] would be cast to uint8 by torchvision")
        planes = {k: target.pop(k) for k in PIXEL_TARGETS if target is not None and k in target}
        image, target = super().resize(image, target)
        if target is not None:
            size = (int(image.shape[-2]), int(image.shape[-1]))
            for key, values in planes.items():
                target[key] = (values.float() if tuple(values.shape[-2:]) == size
                               else resize_plane(values, size, PIXEL_TARGETS[key]))
        return image, target

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[ImageList, list[dict[str, torch.Tensor]] | None]:
        image_list, targets = super().forward(images, targets)
        if targets is not None:
            mean = torch.as_tensor(self.image_mean, dtype=image_list.tensors.dtype, device=image_list.tensors.device)
            std = torch.as_tensor(self.image_std, dtype=image_list.tensors.dtype, device=image_list.tensors.device)
            for i, (h, w) in enumerate(image_list.image_sizes):
                x = image_list.tensors[i, :, :h, :w]
                targets[i]["rgb"] = ((x * std[:, None, None] + mean[:, None, None]) * 255.0).clamp(0, 255)
        return image_list, targets
