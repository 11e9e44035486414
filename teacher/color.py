"""BoxInst colour similarity: sRGB -> CIE-LAB in torch and the pairwise LAB similarity of an image.

The conversion reproduces ``skimage.color.rgb2lab`` (illuminant D65, 2 degree observer) so the pipeline runs on any
device without a numpy round-trip; ``image_color_similarity`` reproduces AdelaiDet's
``CondInst.add_bitmasks_from_boxes`` + ``get_images_color_similarity`` (see ``../shared/goldens/README.md``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# sRGB (linear) -> XYZ, the matrix skimage uses (sRGB specification).
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_D65_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 255] to CIE-LAB (D65, 2 degrees), as ``skimage.color.rgb2lab`` computes it.

    rgb: (..., 3) floating tensor (integer tensors are converted to float32), channels R, G, B in [0, 255].
    Returns (..., 3) L, a, b in the input's floating dtype and on its device.
    """
    if rgb.shape[-1:] != (3,):
        raise ValueError(f"rgb_to_lab: expected a (..., 3) tensor, got shape {tuple(rgb.shape)}")
    if not rgb.is_floating_point():
        rgb = rgb.float()
    arr = rgb / 255.0
    # sRGB companding, then the linear map to XYZ.
    arr = torch.where(arr > 0.04045, ((arr + 0.055) / 1.055).pow(2.4), arr / 12.92)
    matrix = torch.tensor(_XYZ_FROM_RGB, dtype=arr.dtype, device=arr.device)
    xyz = arr @ matrix.T
    xyz = xyz / torch.tensor(_D65_WHITE, dtype=arr.dtype, device=arr.device)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.0).pow(1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-1)


def _downsample_valid(valid: torch.Tensor, stride: int) -> torch.Tensor:
    start = stride // 2
    return valid[..., start::stride, start::stride]


def image_color_similarity(image_rgb_u8: torch.Tensor, stride: int, theta: float = 2.0, size: int = 3,
                           dilation: int = 2, valid: torch.Tensor | None = None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LAB colour similarity of every pixel with its 8 dilated neighbours, BoxInst's pipeline exactly.

    image_rgb_u8: (H,W,3) uint8 RGB, or (N,H,W,3) for N images of one size at once (RoI crops); H and W must be
    multiples of ``stride`` (BoxInst pads images so they are). With a batch, valid is (N,H,W) and the result
    (N,8,h,w).
    valid: optional (H,W) bool/uint8 mask of valid pixels at full resolution (default: all valid); it is sampled
    at ``[s//2::s, s//2::s]`` and the similarity of an edge is multiplied by the **neighbour's** validity.
    Returns (8,h,w) tensor of ``dtype`` (h = H/stride, w = W/stride); value [e,y,x] = exp(-||LAB(y,x) -
    LAB(y+dy_e, x+dx_e)|| / theta), neighbours in ``F.unfold`` order without the centre, 0 outside the image.

    Steps: average-pool to the stride, truncate to uint8 (``.byte()``, not rounding), LAB (computed in float64,
    then cast to ``dtype`` like BoxInst's float32 cast), similarity.
    """
    if image_rgb_u8.dim() not in (3, 4) or image_rgb_u8.shape[-1] != 3:
        raise ValueError(f"image_color_similarity: image must be (H,W,3) or (N,H,W,3), got shape "
                         f"{tuple(image_rgb_u8.shape)}")
    if size != 3:
        raise ValueError(f"image_color_similarity: only size=3 (8 neighbours) is supported, got {size}")
    if stride < 1 or dilation < 1 or theta <= 0:
        raise ValueError(f"image_color_similarity: need stride >= 1, dilation >= 1, theta > 0; got stride={stride}, "
                         f"dilation={dilation}, theta={theta}")
    height, width = image_rgb_u8.shape[-3:-1]
    if height % stride or width % stride:
        raise ValueError(f"image_color_similarity: image size {height}x{width} is not a multiple of stride {stride}")
    if valid is not None and tuple(valid.shape) != tuple(image_rgb_u8.shape[:-1]):
        raise ValueError(f"image_color_similarity: valid mask shape {tuple(valid.shape)} != image size "
                         f"{tuple(image_rgb_u8.shape[:-1])}")
    # avg_pool2d in float32 as the reference does: with a non power-of-two stride the mean is inexact and the
    # truncation below must see the same rounding.
    chw = image_rgb_u8.movedim(-1, -3).float()
    pooled = F.avg_pool2d(chw, kernel_size=stride, stride=stride) if stride > 1 else chw
    rgb = pooled.to(torch.uint8).movedim(-3, -1).to(torch.float64)
    lab = rgb_to_lab(rgb).to(dtype).movedim(-1, -3)  # (..., 3, h, w)
    if valid is None:
        valid_ds = torch.ones(lab.shape[:-3] + lab.shape[-2:], dtype=dtype, device=lab.device)
    else:
        valid_ds = _downsample_valid(valid, stride).to(device=lab.device, dtype=dtype)
    return _neighbour_similarity(lab, valid_ds, theta, dilation)


def _neighbour_similarity(lab: torch.Tensor, valid: torch.Tensor, theta: float, dilation: int) -> torch.Tensor:
    """lab (...,3,h,w), valid (...,h,w) -> (...,8,h,w) exp(-||lab_c - lab_nb|| / theta) * valid_nb, 0 outside."""
    h, w = lab.shape[-2:]
    out = lab.new_zeros((*lab.shape[:-3], 8, h, w))
    for e, (dy, dx) in enumerate(neighbour_offsets(dilation)):
        ys, ye = max(0, -dy), min(h, h - dy)
        xs, xe = max(0, -dx), min(w, w - dx)
        if ys >= ye or xs >= xe:
            continue
        centre = lab[..., :, ys:ye, xs:xe]
        nb = lab[..., :, ys + dy:ye + dy, xs + dx:xe + dx]
        dist = torch.linalg.vector_norm(centre - nb, dim=-3)
        out[..., e, ys:ye, xs:xe] = torch.exp(-dist / theta) * valid[..., ys + dy:ye + dy, xs + dx:xe + dx]
    return out


def neighbour_offsets(dilation: int) -> tuple[tuple[int, int], ...]:
    """The 8 (dy, dx) offsets of a 3x3 neighbourhood with ``dilation``, in ``F.unfold`` order without the centre."""
    return tuple((dy * dilation, dx * dilation) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
