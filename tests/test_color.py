"""teacher.color: torch sRGB -> LAB against skimage, BoxInst colour similarity against the goldens and a
brute-force per-edge loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from teacher.color import image_color_similarity, neighbour_offsets, rgb_to_lab
from goldens import load_golden





def test_offsets_follow_unfold_order():
    assert neighbour_offsets(2) == ((-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2))


@pytest.fixture(scope="module")
def colours() -> np.ndarray:
    rng = np.random.default_rng(0)
    corners = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)])
    # 10 and 11 straddle the sRGB companding knee (0.04045 * 255), dark greys the LAB cube-root knee.
    knees = np.array([[10, 11, 10], [11, 10, 11], [2, 2, 2], [3, 3, 3], [9, 9, 9], [128, 128, 128]])
    return np.concatenate([corners, knees, rng.integers(0, 256, (5000, 3))]).astype(np.uint8)


def test_rgb_to_lab_matches_skimage(colours):
    skcolor = pytest.importorskip("skimage.color")
    ref = skcolor.rgb2lab(colours[None])[0]
    lab64 = rgb_to_lab(torch.from_numpy(colours).double())
    assert lab64.dtype == torch.float64
    np.testing.assert_allclose(lab64.numpy(), ref, rtol=0, atol=1e-9)
    lab32 = rgb_to_lab(torch.from_numpy(colours).float())
    assert lab32.dtype == torch.float32
    np.testing.assert_allclose(lab32.numpy(), ref, rtol=0, atol=1e-4)
    # integer input is accepted (converted to float32) and batch dimensions are kept
    assert torch.allclose(rgb_to_lab(torch.from_numpy(colours).reshape(-1, 2, 3)), lab32.reshape(-1, 2, 3))


def test_rgb_to_lab_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        rgb_to_lab(torch.zeros(4, 4))


@pytest.mark.parametrize("name", [f"boxinst_colorsim_seed{s}_stride{k}.npz" for s in (0, 1) for k in (1, 2, 4)])
def test_color_similarity_matches_boxinst(name):
    z = load_golden(name)
    stride = int(name.split("stride")[1][0])
    np.testing.assert_allclose(rgb_to_lab(torch.from_numpy(z["downsampled_rgb_u8"]).double()).numpy(), z["lab_f64"],
                               rtol=0, atol=1e-9)
    sim = image_color_similarity(torch.from_numpy(z["image_rgb"]), stride, valid=torch.from_numpy(z["image_mask"]))
    assert sim.shape == z["color_sim"].shape and sim.dtype == torch.float32
    np.testing.assert_allclose(sim.numpy(), z["color_sim"], rtol=1e-5, atol=1e-6)
    # the neighbour's validity: with seed0's bottom rows removed, the edges pointing into them are exactly 0
    if z["image_mask"].min() == 0:
        assert (sim.numpy()[z["color_sim"] == 0] == 0).all()


def brute_force_similarity(image: np.ndarray, valid: np.ndarray, stride: int, theta: float, dilation: int):
    """Per-edge loop: pooled+truncated RGB -> skimage LAB -> exp(-||dLAB||/theta) * neighbour validity."""
    skcolor = pytest.importorskip("skimage.color")
    h, w = image.shape[0] // stride, image.shape[1] // stride
    pooled = image.astype(np.float32).reshape(h, stride, w, stride, 3).mean((1, 3), dtype=np.float32)
    lab = skcolor.rgb2lab(pooled.astype(np.uint8))
    valid_ds = valid[stride // 2::stride, stride // 2::stride]
    out = np.zeros((8, h, w))
    for e, (dy, dx) in enumerate(neighbour_offsets(dilation)):
        for y in range(h):
            for x in range(w):
                qy, qx = y + dy, x + dx
                if 0 <= qy < h and 0 <= qx < w:
                    out[e, y, x] = math.exp(-np.linalg.norm(lab[y, x] - lab[qy, qx]) / theta) * valid_ds[qy, qx]
    return out


@pytest.mark.parametrize("height,width,stride,theta,dilation", [
    (12, 16, 2, 2.0, 2),
    (2, 3, 1, 2.0, 2),     # fewer rows than the dilation: only horizontal pairs exist
    (2, 2, 1, 2.0, 2),     # smaller than the dilation: every neighbour is outside, similarity all 0
    (3, 5, 1, 1.5, 1),
    (9, 12, 3, 2.0, 2),
])
def test_color_similarity_brute_force(height, width, stride, theta, dilation):
    rng = np.random.default_rng(height * width)
    image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    valid = (rng.random((height, width)) > 0.2).astype(np.uint8)
    ref = brute_force_similarity(image, valid, stride, theta, dilation)
    for dtype in (torch.float32, torch.float64):
        sim = image_color_similarity(torch.from_numpy(image), stride, theta=theta, dilation=dilation,
                                     valid=torch.from_numpy(valid), dtype=dtype)
        assert sim.dtype == dtype and sim.shape == (8, height // stride, width // stride)
        np.testing.assert_allclose(sim.numpy(), ref, rtol=1e-5 if dtype == torch.float32 else 1e-9, atol=1e-7)
    if max(height, width) <= dilation:
        assert not sim.any()


def test_color_similarity_default_valid_is_all_pixels():
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8))
    ones = torch.ones(8, 8, dtype=torch.bool)
    assert torch.equal(image_color_similarity(image, 2), image_color_similarity(image, 2, valid=ones))


@pytest.mark.parametrize("kwargs,match", [
    (dict(image=torch.zeros(10, 8, 3, dtype=torch.uint8), stride=4), "not a multiple of stride"),
    (dict(image=torch.zeros(8, 8, dtype=torch.uint8), stride=1), r"\(H,W,3\)"),
    (dict(image=torch.zeros(8, 8, 3, dtype=torch.uint8), stride=1, valid=torch.ones(4, 4)), "valid mask shape"),
    (dict(image=torch.zeros(8, 8, 3, dtype=torch.uint8), stride=1, size=5), "size=3"),
    (dict(image=torch.zeros(8, 8, 3, dtype=torch.uint8), stride=0), "stride >= 1"),
])
def test_color_similarity_bad_input(kwargs, match):
    image = kwargs.pop("image")
    with pytest.raises(ValueError, match=match):
        image_color_similarity(image, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_color_similarity_cuda_matches_cpu():
    z = load_golden("boxinst_colorsim_seed0_stride4.npz")
    image, mask = torch.from_numpy(z["image_rgb"]), torch.from_numpy(z["image_mask"])
    cpu = image_color_similarity(image, 4, valid=mask)
    gpu = image_color_similarity(image.cuda(), 4, valid=mask.cuda())
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
