"""COCO loader: boxes, classes, crowd regions, stable instance ids, depth, GT masks and every bad-input case."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from coco_helpers import FakeTerminal, rect_polygon, two_image_coco, write_coco, write_image
from pipeline.datasets.coco import HOLDOUT_SPLIT, CocoDataset, is_held_out
from pipeline.errors import InputError
from pipeline.evaluation import gt_ignore_masks, gt_masks


def test_loads_boxes_classes_crowd_and_ids(tmp_path):
    ann = two_image_coco(tmp_path)
    ds = CocoDataset(tmp_path, ann)
    assert ds.rejects == []
    assert [(c.id, c.name) for c in ds.categories] == [(1, "person"), (3, "car")]
    assert ds.image_ids() == ["1", "2"]
    a = ds.get("1")
    assert (a.height, a.width, a.file_name) == (40, 60, "images/a.png")
    np.testing.assert_array_equal(a.boxes, [[2, 3, 12, 23], [20, 20, 50, 35]])
    assert a.boxes.dtype == np.float32 and a.classes.dtype == np.int32 and a.instance_ids.dtype == np.int32
    np.testing.assert_array_equal(a.classes, [1, 3])
    # The crowd annotation keeps its slot (index 1) but is an ignore region, never an instance.
    np.testing.assert_array_equal(a.instance_ids, [0, 2])
    np.testing.assert_array_equal(a.ignore_boxes, [[30, 5, 50, 15]])
    np.testing.assert_array_equal(a.ignore_classes, [3])
    assert not a.has_depth and a.load_depth() is None
    assert ds.category_name(3) == "car"


def test_load_image_is_rgb(tmp_path):
    ann = two_image_coco(tmp_path)
    ds = CocoDataset(tmp_path, ann)
    expected = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    image = ds.get("1").load_image()
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, expected)


def test_gt_masks_from_polygon_and_rle(tmp_path):
    ann = two_image_coco(tmp_path)
    ds = CocoDataset(tmp_path, ann)
    a, b = ds.get("1"), ds.get("2")
    masks = gt_masks(ds, a)
    assert sorted(masks) == [0, 2]
    expected = np.zeros((40, 60), bool)
    expected[3:23, 2:12] = True
    np.testing.assert_array_equal(masks[0], expected)
    triangle = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[20, 20, 50, 20, 20, 35]], 40, 60)))
    np.testing.assert_array_equal(masks[2], triangle.astype(bool))
    crowd = gt_ignore_masks(ds, a)
    assert len(crowd) == 1 and crowd[0].sum() == 200 and crowd[0][5:15, 30:50].all()
    rle_mask = gt_masks(ds, b)[0]
    assert rle_mask.sum() == 20 and rle_mask[3:13, 5:7].all()


def test_compressed_rle_and_box_only_annotations(tmp_path):
    mask = np.zeros((20, 20), np.uint8)
    mask[4:10, 6:16] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    images = [{"id": "img-a", "file_name": "a.png", "height": 20, "width": 20}]
    anns = [{"id": 1, "image_id": "img-a", "category_id": 1, "bbox": [6, 4, 10, 6], "segmentation": rle},
            {"id": 2, "image_id": "img-a", "category_id": 3, "bbox": [0, 0, 5, 5]}]
    ds = CocoDataset(tmp_path, write_coco(tmp_path, images, anns))
    sample = ds.get("img-a")
    masks = gt_masks(ds, sample)
    # The box-only annotation is a training instance without a GT mask.
    np.testing.assert_array_equal(sample.instance_ids, [0, 1])
    assert list(masks) == [0]
    np.testing.assert_array_equal(masks[0], mask.astype(bool))


def test_box_within_one_pixel_is_clipped(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [-0.7, 2.0, 10.0, 18.6]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [25.0, 0.0, 5.9, 5.0]}]
    ds = CocoDataset(tmp_path, write_coco(tmp_path, images, anns))
    assert ds.rejects == []
    np.testing.assert_allclose(ds.get("1").boxes, [[0, 2, 9.3, 20], [25, 0, 30, 5]], atol=1e-5)


def _bad_annotation_case(tmp_path: Path, bad: dict) -> tuple[Path, dict]:
    """Image 1 with a good person box, then ``bad``, then a good car box; image 2 with a good box."""
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
              {"id": 2, "file_name": "b.png", "height": 20, "width": 30}]
    good = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [10, 10, 5, 5]},
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [2, 2, 4, 4]}]
    return write_coco(tmp_path, images, [good[0], {"id": 2, "image_id": 1, "category_id": 1, **bad}, *good[1:]]), bad


@pytest.mark.parametrize("bad, message", [
    ({"bbox": [5, 5, 0, 4]}, "bbox [5, 5, 0, 4] (x, y, w, h) has w <= 0"),
    ({"bbox": [5, 5, 4, -1]}, "has h <= 0"),
    ({"bbox": [25, 5, 6.5, 4]}, "box [25, 5, 31.5, 9] lies outside the 30x20 image"),
    ({"bbox": [40, 5, 6, 4]}, "lies outside the 30x20 image"),
    ({"bbox": [5, 5, 4]}, "is not 4 finite numbers"),
    ({"bbox": [5, 5, 4, 4], "category_id": 99}, "refers to unknown category 99"),
    ({"bbox": [5, 5, 4, 4], "image_id": 7}, "annotation 2 refers to unknown image 7"),
])
def test_bad_annotation_is_rejected_alone(tmp_path, bad, message):
    ann, _ = _bad_annotation_case(tmp_path, bad)
    ds = CocoDataset(tmp_path, ann)
    assert len(ds.rejects) == 1
    reject = ds.rejects[0]
    assert reject.where == str(ann) and message in reject.problem
    assert "\n" not in str(reject)
    # Nothing else is lost, and the good boxes keep their instance ids (slot 1 was the bad one).
    first = ds.get("1")
    expected_ids = [0, 1] if "image_id" in bad else [0, 2]
    np.testing.assert_array_equal(first.instance_ids, expected_ids)
    np.testing.assert_array_equal(first.boxes, [[1, 1, 6, 6], [10, 10, 15, 15]])
    assert len(ds.get("2").boxes) == 1

    with pytest.raises(InputError) as info:
        CocoDataset(tmp_path, ann, strict=True)
    assert str(info.value) == f"{ann}: {reject.problem}"


def test_min_box_side(tmp_path):
    ann, _ = _bad_annotation_case(tmp_path, {"bbox": [5, 5, 0.5, 4]})
    ds = CocoDataset(tmp_path, ann, min_box_side=1.0)
    assert len(ds.rejects) == 1 and "thinner than 1 px" in ds.rejects[0].problem


def test_malformed_segmentation_keeps_the_box(tmp_path):
    ann, _ = _bad_annotation_case(tmp_path, {"bbox": [5, 5, 4, 4], "segmentation": [[1, 2, 3]]})
    ds = CocoDataset(tmp_path, ann)
    assert len(ds.rejects) == 1 and "malformed segmentation" in ds.rejects[0].problem
    sample = ds.get("1")
    np.testing.assert_array_equal(sample.instance_ids, [0, 1, 2])
    assert 1 not in gt_masks(ds, sample)
    with pytest.raises(InputError, match="malformed segmentation"):
        CocoDataset(tmp_path, ann, strict=True)


def test_missing_image_is_skipped_and_recorded(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
              {"id": 2, "file_name": "missing.png", "height": 20, "width": 30}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]}]
    ann = write_coco(tmp_path, images, anns, write_images=False)
    write_image(tmp_path / "a.png", 20, 30)
    ds = CocoDataset(tmp_path, ann)
    assert ds.image_ids() == ["1"]
    # One reject for the image; its annotation is not reported again as "unknown image".
    assert [str(r) for r in ds.rejects] == [f"{tmp_path / 'missing.png'}: image file not found"]
    with pytest.raises(InputError, match="missing.png: image file not found"):
        CocoDataset(tmp_path, ann, strict=True)


def test_unreadable_image_fails_at_load_time(tmp_path):
    ann = two_image_coco(tmp_path)
    (tmp_path / "images" / "b.png").write_bytes(b"not a png at all")
    (tmp_path / "images" / "a.png").write_bytes(cv2.imencode(".png", np.zeros((10, 10, 3), np.uint8))[1])
    ds = CocoDataset(tmp_path, ann)
    assert len(ds) == 2 and ds.rejects == []
    with pytest.raises(InputError) as info:
        ds.get("2").load_image()
    assert str(tmp_path / "images" / "b.png") in str(info.value) and "unreadable image" in str(info.value)
    with pytest.raises(InputError, match="image is 10x10, the annotation file says 60x40"):
        ds.get("1").load_image()


@pytest.mark.parametrize("text, message", [
    ('{"images": [', "malformed json at line 1"),
    ('[1, 2]', "the top level must be an object"),
    ('{"images": [], "annotations": {}, "categories": []}', "'annotations' must be a list"),
])
def test_malformed_annotation_file_raises_even_when_lenient(tmp_path, text, message):
    ann = tmp_path / "bad.json"
    ann.write_text(text)
    with pytest.raises(InputError) as info:
        CocoDataset(tmp_path, ann)
    assert str(info.value).startswith(f"{ann}: ") and message in str(info.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(InputError, match="nope.json: file not found"):
        CocoDataset(tmp_path, tmp_path / "nope.json")


def test_bad_image_and_category_entries(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
              {"id": 2, "file_name": "b.png", "height": 0, "width": 30},
              {"id": 1, "file_name": "c.png", "height": 20, "width": 30}]
    cats = [{"id": 1, "name": "person"}, {"id": "x"}]
    ann = write_coco(tmp_path, images[:1], [], categories=cats)
    write_image(tmp_path / "c.png", 20, 30)
    data = json.loads(ann.read_text())
    data["images"] = images
    ann.write_text(json.dumps(data))
    ds = CocoDataset(tmp_path, ann)
    problems = [r.problem for r in ds.rejects]
    assert problems == ["category entry #1 needs an integer 'id' and a string 'name'",
                        "image 2 needs positive integer 'height' and 'width', got 0 x 30",
                        "image id 1 appears twice"]
    assert ds.image_ids() == ["1"] and [c.name for c in ds.categories] == ["person"]


def _depth_case(tmp_path: Path, depth_file: str, scale=None) -> Path:
    entry = {"id": 1, "file_name": "a.png", "height": 4, "width": 5, "depth_file": depth_file}
    if scale is not None:
        entry["depth_scale"] = scale
    images = [entry, {"id": 2, "file_name": "b.png", "height": 4, "width": 5}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 2, 2]}]
    return write_coco(tmp_path, images, anns)


def test_depth_from_16bit_png(tmp_path):
    stored = np.arange(20, dtype=np.uint16).reshape(4, 5) * 1000
    (tmp_path / "depth").mkdir()
    assert cv2.imwrite(str(tmp_path / "depth" / "a.png"), stored)
    ds = CocoDataset(tmp_path, _depth_case(tmp_path, "depth/a.png", scale=0.001))
    a, b = ds.get("1"), ds.get("2")
    assert a.has_depth and not b.has_depth and ds.has_depth
    depth = a.load_depth()
    assert depth.dtype == np.float32 and depth.shape == (4, 5)
    np.testing.assert_allclose(depth, stored * 0.001, rtol=1e-6)
    assert b.load_depth() is None


def test_depth_from_npy_defaults_to_metres(tmp_path):
    stored = np.full((4, 5), 2.5, np.float32)
    stored[0, 0] = np.nan
    stored[0, 1] = -1
    np.save(tmp_path / "a.npy", stored)
    ds = CocoDataset(tmp_path, _depth_case(tmp_path, "a.npy"))
    depth = ds.get("1").load_depth()
    assert depth[0, 0] == 0 and depth[0, 1] == 0 and depth[1:].min() == 2.5


def test_depth_shape_mismatch_fails_at_load_time(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((3, 3), np.float32))
    ds = CocoDataset(tmp_path, _depth_case(tmp_path, "a.npy"))
    with pytest.raises(InputError, match="a.npy: depth map is 3x3, the image is 5x4"):
        ds.get("1").load_depth()


@pytest.mark.parametrize("depth_file, scale, message", [
    ("missing.png", 0.001, "missing.png: depth file of image 1 not found"),
    ("depth.exr", 1.0, "depth.exr: depth file must be a 16-bit .png or a .npy"),
    ("a.npy", -2, "'depth_scale' must be a positive number"),
    (7, None, "image 1: 'depth_file' must be a path relative to the data root"),
])
def test_bad_depth_keeps_the_image_without_depth(tmp_path, depth_file, scale, message):
    """A bad depth_file / depth_scale costs the depth only: the image and its boxes stay (lenient), the
    reject says so; strict mode stops with the plain message."""
    np.save(tmp_path / "a.npy", np.ones((4, 5), np.float32))
    ann = _depth_case(tmp_path, depth_file, scale)
    ds = CocoDataset(tmp_path, ann)
    assert ds.image_ids() == ["1", "2"] and len(ds.rejects) == 1
    assert message in str(ds.rejects[0]) and str(ds.rejects[0]).endswith("; image kept without depth")
    a = ds.get("1")
    assert not a.has_depth and a.load_depth() is None and not ds.has_depth
    np.testing.assert_array_equal(a.boxes, [[0, 0, 2, 2]])
    assert a.load_image().shape == (4, 5, 3)
    with pytest.raises(InputError) as raised:
        CocoDataset(tmp_path, ann, strict=True)
    assert message in str(raised.value) and "kept" not in str(raised.value)


def test_index_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    ann = two_image_coco(tmp_path)
    CocoDataset(tmp_path, ann)
    assert capsys.readouterr().err == ""              # captured (not a terminal): silent
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    CocoDataset(tmp_path, ann)
    shown = terminal.getvalue()
    assert "index annotations.json images" in shown and "index annotations.json annotations" in shown
    assert "\n" not in shown                          # cleared when done, no lines left behind


def test_rect_polygon_helper_matches_box():
    # Guards the helper the other tests rely on: the polygon of a box rasterises to exactly the box.
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(rect_polygon(2, 3, 12, 23), 40, 60)))
    assert mask.sum() == 200 and mask[3:23, 2:12].all()


def _many_images(tmp_path: Path, n: int) -> Path:
    images = [{"id": 100 + k, "file_name": f"images/{k}.png", "height": 20, "width": 30} for k in range(n)]
    anns = [{"id": k, "image_id": 100 + k, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0} for k in range(n)]
    return write_coco(tmp_path, images, anns, [{"id": 1, "name": "thing"}])


def test_holdout_splits_one_file_by_image_id_hash_stably(tmp_path):
    ann = _many_images(tmp_path, 40)
    train = CocoDataset(tmp_path, ann, "train", holdout=0.25).image_ids()
    held = CocoDataset(tmp_path, ann, HOLDOUT_SPLIT, holdout=0.25).image_ids()
    assert not set(train) & set(held) and sorted(train + held, key=int) == [str(100 + k) for k in range(40)]
    assert held == [i for i in (str(100 + k) for k in range(40)) if is_held_out(i, 0.25)]
    assert 4 <= len(held) <= 16                       # about a quarter of 40
    # The side an image falls on is its id's, not its place in the file: reversed, the same images are held out.
    data = json.loads(Path(ann).read_text())
    data["images"].reverse()
    Path(ann).write_text(json.dumps(data))
    assert sorted(CocoDataset(tmp_path, ann, HOLDOUT_SPLIT, holdout=0.25).image_ids()) == sorted(held)
    assert CocoDataset(tmp_path, ann, "train").image_ids().__len__() == 40   # holdout 0: the whole file


def test_holdout_is_checked_and_only_for_coco(tmp_path):
    from pipeline.config import DatasetConfig
    from pipeline.datasets import build_dataset
    from pipeline.errors import ConfigError
    ann = _many_images(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"dataset.holdout: must be a fraction in \[0, 1\), got 1.5"):
        build_dataset(DatasetConfig(name="coco", root=str(tmp_path), ann=str(ann), holdout=1.5))
    with pytest.raises(ConfigError, match="dataset.holdout: splits COCO-format files only; cityscapes has its own"):
        build_dataset(DatasetConfig(name="cityscapes", root=str(tmp_path), holdout=0.2))


def test_the_evaluation_reads_the_held_out_images_unless_another_file_is_named():
    from pipeline.config import Config
    from pipeline.model_eval import eval_dataset_config
    cfg = Config()
    cfg.dataset.name, cfg.dataset.holdout = "coco", 0.2
    assert eval_dataset_config(cfg).dataset.split == HOLDOUT_SPLIT
    cfg.evaluation.ann = "val.json"
    out = eval_dataset_config(cfg).dataset
    assert (out.ann, out.holdout, out.split) == ("val.json", 0.0, "val")
