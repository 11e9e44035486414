"""Per-pixel targets stay aligned with the image: through torchvision's transform (the two traps: masks cast to
uint8, other per-pixel targets not resized) and through the data pipeline's resize, flip and crop (issue 9,
items 2 and 3)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from student.config import StudentConfig
from student.data import TrainImages, flip_cells
from student.pseudo_labels import Correspondence, PseudoLabel
from student.transform import PixelAlignedTransform

H, W = 60, 80
SQUARE = (slice(10, 30), slice(40, 70))       # rows, cols of a known shape


def square_plane(value: float = 1.0) -> np.ndarray:
    plane = np.zeros((H, W), np.float32)
    plane[SQUARE] = value
    return plane


def centroid(plane) -> tuple[float, float]:
    plane = np.asarray(plane, np.float64)
    ys, xs = np.nonzero(plane > 0.5 * plane.max())
    return float(ys.mean()), float(xs.mean())


@pytest.mark.parametrize("training", [False, True])
def test_transform_resizes_depth_and_soft_pseudo_masks_with_the_image(training):
    t = PixelAlignedTransform(min_size=90, max_size=1000, test_size=90, resize_in_training=True)
    t.train(training)
    image = torch.zeros(3, H, W)
    image[:, SQUARE[0], SQUARE[1]] = 1.0
    depth = torch.from_numpy(square_plane(7.5))
    soft = torch.from_numpy(square_plane(0.6))[None]
    target = {"boxes": torch.tensor([[40.0, 10.0, 70.0, 30.0]]), "labels": torch.tensor([1]), "depth": depth,
              "pseudo_masks": soft}
    images, (out,) = t([image], [target])
    h, w = images.image_sizes[0]
    assert (h, w) == (90, 120)
    assert out["depth"].shape == (h, w) and out["pseudo_masks"].shape == (1, h, w) and out["rgb"].shape == (3, h, w)
    # Trap 1: soft values survive (torchvision's .byte() would have made them 0).
    assert out["pseudo_masks"].dtype == torch.float32 and abs(float(out["pseudo_masks"].max()) - 0.6) < 1e-5
    # Depth is resampled nearest: only values that existed.
    assert set(np.unique(out["depth"].numpy())) <= {0.0, 7.5}
    # Trap 2: every plane lines up with the resized image and the resized box.
    ref = centroid(out["rgb"][0].numpy())
    for plane in (out["depth"].numpy(), out["pseudo_masks"][0].numpy()):
        assert np.allclose(centroid(plane), ref, atol=0.6)
    x1, y1, x2, y2 = out["boxes"][0].tolist()
    assert np.allclose(ref, ((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5), atol=0.6)


def test_transform_refuses_masks_and_skips_resize_in_training_by_default():
    t = PixelAlignedTransform(min_size=90, max_size=1000).train()
    target = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, H, W)}
    with pytest.raises(ValueError, match="pseudo_masks"):
        t([torch.zeros(3, H, W)], [target])
    images, _ = t([torch.zeros(3, H, W)], [{"boxes": target["boxes"], "labels": target["labels"]}])
    assert images.image_sizes[0] == (H, W)


@dataclass
class FakeSample:
    image_id: str = "img"
    file_name: str = "img.png"
    height: int = H
    width: int = W
    boxes: np.ndarray = field(default_factory=lambda: np.array([[40.0, 10.0, 70.0, 30.0], [0, 0, 10, 10]], np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.array([1, 2], np.int32))
    instance_ids: np.ndarray = field(default_factory=lambda: np.array([0, 1], np.int32))

    def load_image(self):
        img = np.zeros((H, W, 3), np.uint8)
        img[SQUARE] = 255
        return img

    def load_depth(self):
        return np.where(square_plane() > 0, 3.0, 20.0).astype(np.float32)


class FakeLabels:
    def get(self, image_id, instance_id):
        if instance_id != 0:
            return None
        corr = [Correspondence(("other", 3), 7, np.array([0, 8, 13]), np.array([1, 2, 3]), np.ones(3, np.float32))]
        return PseudoLabel(square_plane() > 0, 0.9, corr)


def item(**cfg_kw):
    cfg = StudentConfig(min_size=[H], max_size=1000, **cfg_kw)
    return TrainImages([FakeSample()], [1, 2], cfg, FakeLabels())[0]


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_flip_moves_image_boxes_depth_pseudo_masks_and_cells_together(flip):
    image, target = item(flip=flip, crop=[])
    assert target["flipped"] is bool(flip)
    ref = centroid(image[0].numpy())
    assert np.allclose(centroid(target["pseudo_masks"][0].numpy()), ref)
    assert np.allclose(centroid((target["depth"] < 10).numpy()), ref)
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    assert np.allclose(ref, ((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5))
    (partner, grid, src, dst, weight), = target["correspondences"][0]
    want = flip_cells(np.array([0, 8, 13]), 7) if flip else np.array([0, 8, 13])
    assert partner == ("other", 3) and grid == 7 and src.tolist() == list(want) and dst.tolist() == [1, 2, 3]
    assert target["pseudo_weight"].tolist() == pytest.approx([0.9, 0.0])
    assert target["labels"].tolist() == [1, 2]


def test_flip_cells_mirrors_columns():
    assert flip_cells(np.array([0, 6, 7, 48]), 7).tolist() == [6, 0, 13, 42]


@pytest.mark.parametrize("key", [0, (0, 90)])
def test_multiscale_resize_keeps_alignment(key):
    # An int key draws the short side from min_size; an (index, short) key, as the training loop passes, uses it.
    cfg = StudentConfig(min_size=[90] if key == 0 else [400, 500], max_size=1000, flip=0.0, crop=[])
    image, target = TrainImages([FakeSample()], [1, 2], cfg, FakeLabels())[key]
    assert tuple(image.shape[1:]) == (90, 120)
    ref = centroid(image[0].numpy())
    assert np.allclose(centroid(target["pseudo_masks"][0].numpy()), ref, atol=0.6)
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    assert np.allclose(ref, ((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5), atol=0.6)


def test_crop_clips_boxes_and_drops_the_correspondences_of_cut_instances():
    torch.manual_seed(0)
    seen_cut = False
    for _ in range(20):
        image, target = item(flip=0.0, crop=[40, 50])
        assert tuple(image.shape[1:]) == (40, 50)
        assert (target["boxes"][:, 2] <= 50).all() and (target["boxes"][:, 3] <= 40).all()
        for i, ok in enumerate(target["queue_ok"].tolist()):
            if not ok:
                seen_cut = True
                assert target["correspondences"][i] == []
        if len(target["boxes"]) and target["instance_ids"][0] == 0:
            ref = image[0].numpy()
            if ref.max() > 0:
                assert np.allclose(centroid(target["pseudo_masks"][0].numpy()), centroid(ref))
    assert seen_cut
