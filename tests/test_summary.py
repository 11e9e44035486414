"""``pipeline summary``: the figures (checked against independent computations), the table, errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from coco_helpers import two_image_coco
from pipeline.cli import main
from pipeline.datasets.cityscapes import CityscapesDataset
from pipeline.datasets.toy import generate_toy
from pipeline.evaluation import gt_masks


def run_summary(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["summary", *args])
    out, err = capsys.readouterr()
    return code, out, err


def box_iou_by_hand(box, mask: np.ndarray) -> float:
    x1, y1, x2, y2 = box
    filled = np.zeros_like(mask)
    filled[math.floor(y1):math.ceil(y2), math.floor(x1):math.ceil(x2)] = True
    return float((filled & mask).sum() / (filled | mask).sum())


def test_coco_summary_figures(tmp_path, capsys):
    ann = two_image_coco(tmp_path)
    out_json = tmp_path / "out" / "summary.json"
    code, out, _ = run_summary(capsys, "--dataset", "coco", "--data-root", str(tmp_path), "--ann", str(ann),
                               "--json", str(out_json))
    assert code == 0
    report = json.loads(out_json.read_text())
    assert list(report["splits"]) == ["train"]
    fig = report["splits"]["train"]
    assert (fig["images"], fig["instances"], fig["ignored_regions"], fig["images_with_depth"]) == (2, 3, 1, 0)
    assert fig["instances_per_class"] == {"person": 2, "car": 1}
    assert fig["ignored_per_class"] == {"car": 1} and fig["rejects"] == []
    # The rectangle person and the RLE person fill their boxes exactly; the car is a right triangle.
    triangle = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([[20, 20, 50, 20, 20, 35]], 40, 60)))
    car = box_iou_by_hand([20, 20, 50, 35], triangle.astype(bool))
    assert 0.4 < car < 0.6
    all_iou = fig["box_iou"]
    assert all_iou["overall"]["count"] == 3
    assert all_iou["overall"]["mean_iou"] == pytest.approx((1.0 + 1.0 + car) / 3)
    assert all_iou["per_class"]["person"] == {"count": 2, "mean_iou": 1.0}
    assert all_iou["per_class"]["car"]["mean_iou"] == pytest.approx(car)
    # The RLE person's box is 2 px wide: out of the >= 8 px figure.
    min_iou = fig["box_iou_min_side"]
    assert min_iou["min_box_side"] == 8 and min_iou["excluded"] == 1
    assert min_iou["overall"]["mean_iou"] == pytest.approx((1.0 + car) / 2)
    assert min_iou["per_size"]["large"]["mean_iou"] is None          # nan becomes null
    assert "== coco / train" in out
    assert "baseline every labeler must beat: box-as-mask mean IoU " \
           f"{(1.0 + car) / 2:.3f} over 2 instances with box sides >= 8 px" in out
    person_row = next(line for line in out.splitlines() if line.strip().startswith("person"))
    assert person_row.split() == ["person", "2", "0", "1.000", "1", "1.000"]


def test_summary_lists_rejects(tmp_path, capsys):
    ann = two_image_coco(tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 99, "image_id": 2, "category_id": 1, "bbox": [45, 2, 20, 5]})
    ann.write_text(json.dumps(data))
    out_json = tmp_path / "s.json"
    code, out, _ = run_summary(capsys, "--dataset", "coco", "--data-root", str(tmp_path), "--ann", str(ann),
                               "--json", str(out_json), "--min-box-side", "0")
    assert code == 0
    fig = json.loads(out_json.read_text())["splits"]["train"]
    assert len(fig["rejects"]) == 1 and "lies outside the 50x30 image" in fig["rejects"][0]["problem"]
    assert fig["instances"] == 3                 # nothing else lost
    assert "rejects           1" in out and "annotation 99 (image 2)" in out


def test_toy_summary_generates_data_and_reports_every_split(tmp_path, capsys):
    cache = tmp_path / "toy"
    out_json = tmp_path / "toy.json"
    code, out, _ = run_summary(capsys, "--dataset", "toy", "--json", str(out_json),
                               "--set", f"dataset.toy.cache_dir={cache}", "--set", "dataset.toy.train=2",
                               "--set", "dataset.toy.val=1", "--set", "dataset.toy.size=96x192")
    assert code == 0 and (cache / "leftImg8bit" / "train").is_dir()
    report = json.loads(out_json.read_text())
    assert list(report["splits"]) == ["train", "val"]
    for split, n in (("train", 2), ("val", 1)):
        fig = report["splits"][split]
        ds = CityscapesDataset(cache, split)
        assert fig["images"] == n and fig["images_with_depth"] == n
        assert fig["instances"] == sum(len(s.boxes) for s in ds) > 0
        assert fig["ignored_regions"] == sum(len(s.ignore_boxes) for s in ds)
        ious = [box_iou_by_hand(box, gt_masks(ds, s)[int(i)]) for s in ds for i, box in zip(s.instance_ids, s.boxes)]
        assert fig["box_iou"]["overall"]["mean_iou"] == pytest.approx(np.mean(ious))
        assert f"== toy / {split}" in out
    code, out, _ = run_summary(capsys, "--dataset", "toy", "--split", "val",
                               "--set", f"dataset.toy.cache_dir={cache}")
    assert code == 0 and "== toy / val" in out and "== toy / train" not in out


def test_coco_needs_root_and_ann(tmp_path, capsys):
    code, _, err = run_summary(capsys, "--dataset", "coco", "--data-root", str(tmp_path))
    assert code == 2
    assert err.strip().startswith("error: --ann: the coco dataset needs --data-root DIR")
    assert len(err.strip().splitlines()) == 1


def test_cityscapes_needs_a_root(capsys, monkeypatch):
    monkeypatch.delenv("CITYSCAPES_DATASET", raising=False)
    code, _, err = run_summary(capsys, "--dataset", "cityscapes")
    assert code == 2 and "--data-root" in err and "$CITYSCAPES_DATASET" in err and "neither is set" in err


def test_cityscapes_root_from_environment(tmp_path, capsys, monkeypatch):
    generate_toy(tmp_path / "cs", train=1, val=0, seed=1, size=(64, 128))
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path / "cs"))
    code, out, _ = run_summary(capsys, "--dataset", "cityscapes")
    assert code == 0 and "== cityscapes / train" in out and "/ val" not in out


def test_malformed_annotation_file_is_one_line(tmp_path, capsys):
    ann = tmp_path / "a.json"
    ann.write_text("{")
    code, _, err = run_summary(capsys, "--dataset", "coco", "--data-root", str(tmp_path), "--ann", str(ann))
    assert code == 2 and err.strip() == f"error: {ann}: malformed json at line 1 column 2: " \
                                        "Expecting property name enclosed in double quotes"


def test_config_file_names_the_dataset(tmp_path, capsys):
    """`--config FILE` alone: the file's dataset (name, root) is used, not the toy default of --dataset."""
    root = generate_toy(tmp_path / "cs", train=1, val=1, seed=1, size=(64, 128))
    config = tmp_path / "mine.yaml"
    config.write_text(f"dataset:\n  name: cityscapes\n  root: {root}\n")
    out_json = tmp_path / "s.json"
    code, out, _ = run_summary(capsys, "--config", str(config), "--json", str(out_json))
    assert code == 0 and "== cityscapes / train" in out and "== cityscapes / val" in out and "toy" not in out
    report = json.loads(out_json.read_text())
    assert report["dataset"] == "cityscapes" and report["splits"]["train"]["root"] == str(root)


# ----------------------------------------------------------------------------------------- --check-images

def _truncate_after_header(path) -> None:
    """Keep the PNG signature and the IHDR chunk (33 bytes): the size is readable, the pixels are gone."""
    path.write_bytes(path.read_bytes()[:33])


@pytest.fixture
def damaged_toy(tmp_path):
    """A 3-image Cityscapes-layout root whose second image is truncated after its PNG header."""
    root = generate_toy(tmp_path / "cs", train=3, val=0, seed=2, size=(64, 128))
    images = sorted((root / "leftImg8bit" / "train").rglob("*.png"))
    _truncate_after_header(images[1])
    return root, images[1]


def test_summary_without_check_images_decodes_nothing(damaged_toy, tmp_path, capsys, monkeypatch):
    import cv2

    def forbidden(*args, **kwargs):
        raise AssertionError("summary decoded an image without --check-images")

    monkeypatch.setattr(cv2, "imdecode", forbidden)
    root, _ = damaged_toy
    out_json = tmp_path / "s.json"
    code, out, _ = run_summary(capsys, "--dataset", "cityscapes", "--data-root", str(root), "--json", str(out_json))
    fig = json.loads(out_json.read_text())["splits"]["train"]
    assert code == 0 and fig["images"] == 3 and fig["rejects"] == [] and not fig["images_checked"]
    assert "(not decoded; --check-images decodes them)" in out


def test_check_images_rejects_a_truncated_image_and_keeps_the_rest(damaged_toy, tmp_path, capsys):
    root, bad = damaged_toy
    out_json = tmp_path / "s.json"
    code, out, _ = run_summary(capsys, "--dataset", "cityscapes", "--data-root", str(root), "--check-images",
                               "--json", str(out_json))
    assert code == 0
    fig = json.loads(out_json.read_text())["splits"]["train"]
    assert fig["rejects"] == [{"where": str(bad), "problem": "unreadable image (corrupt or not an image format "
                                                             "OpenCV can decode)"}]
    good = [s for s in CityscapesDataset(root, "train") if s.file_name != bad.relative_to(root).as_posix()]
    assert len(good) == 2
    assert fig["images"] == 2 and fig["images_with_depth"] == 2 and fig["images_checked"]
    assert fig["instances"] == sum(len(s.boxes) for s in good)
    assert fig["box_iou"]["overall"]["count"] == fig["instances"]
    assert "rejects           1" in out and f"{bad}: unreadable image" in out and "(all decoded)" in out


def test_check_images_keeps_an_image_whose_depth_is_unreadable(tmp_path, capsys):
    root = generate_toy(tmp_path / "cs", train=2, val=0, seed=2, size=(64, 128))
    disparity = sorted((root / "disparity" / "train").rglob("*.png"))[0]
    _truncate_after_header(disparity)
    out_json = tmp_path / "s.json"
    code, _, _ = run_summary(capsys, "--dataset", "cityscapes", "--data-root", str(root), "--check-images",
                             "--json", str(out_json))
    fig = json.loads(out_json.read_text())["splits"]["train"]
    assert code == 0 and fig["images"] == 2 and fig["images_with_depth"] == 1
    assert [r["where"] for r in fig["rejects"]] == [str(disparity)]
    assert fig["rejects"][0]["problem"].endswith("; image kept without depth")


def test_check_images_strict_stops_with_one_line_naming_the_file(damaged_toy, capfd):
    root, bad = damaged_toy
    code = main(["summary", "--dataset", "cityscapes", "--data-root", str(root), "--check-images", "--strict"])
    out, err = capfd.readouterr()
    assert code == 2 and "== cityscapes" not in out
    # One line on stderr, also at the file-descriptor level: OpenCV's and libpng's own warnings are silenced.
    assert err.count("\n") == 1, err
    assert err.rstrip("\n").split("\r")[-1] == f"error: {bad}: unreadable image (corrupt or not an image format " \
                                               "OpenCV can decode)"
