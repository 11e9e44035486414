"""The resume digest of a labeling run: the dataset's own fingerprint (its content, not its path) plus the teacher.
The same data moved elsewhere resumes; an edited box, another toy generation or another teacher does not."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import Config
from pipeline.datasets.cityscapes import CityscapesDataset
from pipeline.datasets.coco import CocoDataset
from pipeline.datasets.toy import generate_toy
from pipeline.errors import UserError
from pipeline.label_service import label_digest
from pipeline.labeling import prepare_label
from pipeline.shards import ShardWriter, check_resumable


def write_coco(root: Path, name: str, box: list[float]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "a.png"), np.zeros((9, 9, 3), np.uint8))
    path = root / name
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "height": 9, "width": 9}],
                                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box}],
                                "categories": [{"id": 1, "name": "a"}]}))
    return path


def test_coco_fingerprint_is_the_annotations_content_not_their_path(tmp_path, monkeypatch):
    def fingerprint(root, ann, **kw):
        return CocoDataset(root, ann, **kw).fingerprint()

    write_coco(tmp_path, "A.json", [1, 1, 4, 4])
    monkeypatch.chdir(tmp_path)
    first = fingerprint(tmp_path, "A.json")
    assert fingerprint(".", "./A.json") == first and fingerprint(tmp_path, tmp_path / "A.json") == first
    write_coco(tmp_path / "moved", "B.json", [1, 1, 4, 4])
    assert fingerprint(tmp_path / "moved", tmp_path / "moved" / "B.json") == first   # same data elsewhere
    write_coco(tmp_path, "A.json", [1, 1, 4, 5])                                     # a box edited in place
    assert fingerprint(tmp_path, "A.json") != first
    assert fingerprint(tmp_path, "A.json", min_box_side=6.0) != fingerprint(tmp_path, "A.json")  # box dropped
    assert fingerprint(tmp_path, "A.json", split="val") != fingerprint(tmp_path, "A.json")


def test_cityscapes_fingerprint_follows_the_annotations(tmp_path):
    root = generate_toy(tmp_path / "toy", train=2, val=0, seed=0, size=(64, 128))
    first = CityscapesDataset(root, "train").fingerprint()
    moved = Path(shutil.copytree(root, tmp_path / "moved"))
    assert CityscapesDataset(moved, "train").fingerprint() == first
    other = generate_toy(tmp_path / "other", train=2, val=0, seed=1, size=(64, 128))
    assert CityscapesDataset(other, "train").fingerprint() != first                  # another toy generation
    polygons = sorted(moved.glob("gtFine/train/*/*_polygons.json"))[0]
    data = json.loads(polygons.read_text())
    data["objects"] = data["objects"][:-1]                                           # an object deleted
    polygons.write_text(json.dumps(data))
    assert CityscapesDataset(moved, "train").fingerprint() != first


def test_label_digest_combines_the_fingerprint_teacher_and_round():
    cfg = Config()
    base = label_digest("f1", cfg.teacher, "box-prior", 0)
    assert label_digest("f1", cfg.teacher, "box-prior", 0) == base and len(base) == 16
    assert label_digest("f2", cfg.teacher, "box-prior", 0) != base
    assert label_digest("f1", cfg.teacher, "abc123", 0) != base
    assert label_digest("f1", cfg.teacher, "box-prior", 1) != base
    assert label_digest("f1", dataclasses.replace(cfg.teacher, device="cuda"), "box-prior", 0) == base
    # Joint resolution of overlaps changes the labels: its setting and its knobs are part of the digest.
    assert label_digest("f1", dataclasses.replace(cfg.teacher, occlusion="off"), "box-prior", 0) != base
    joint = dataclasses.replace(cfg.teacher.joint, colour_weight=cfg.teacher.joint.colour_weight + 1)
    assert label_digest("f1", dataclasses.replace(cfg.teacher, joint=joint), "box-prior", 0) != base


def test_a_labeling_run_resumes_after_the_data_moved_but_not_after_an_edit(tmp_path):
    """Through ``prepare_label``: the shard directory's digest is the dataset's content with the teacher."""
    def prepare(root, ann):
        cfg = Config()
        cfg.dataset.name, cfg.dataset.root, cfg.dataset.ann = "coco", str(root), str(ann)
        return prepare_label(cfg, tmp_path / "out")

    ann = write_coco(tmp_path / "data", "A.json", [1, 1, 4, 4])
    service = prepare(tmp_path / "data", ann)
    with ShardWriter(tmp_path / "out", service.meta):
        pass
    moved = write_coco(tmp_path / "moved", "B.json", [1, 1, 4, 4])
    assert prepare(tmp_path / "moved", moved).meta.config_digest == service.meta.config_digest
    write_coco(tmp_path / "data", "A.json", [1, 1, 4, 5])
    with pytest.raises(UserError, match="out: holds shards of another config"):
        prepare(tmp_path / "data", ann)
    assert check_resumable(tmp_path / "out", service.meta) is not None
    with pytest.raises(UserError, match="missing.json"):
        prepare(tmp_path / "data", tmp_path / "missing.json")


def test_shards_written_with_another_occlusion_setting_are_refused(tmp_path):
    ann = write_coco(tmp_path / "data", "A.json", [1, 1, 4, 4])

    def prepare(occlusion):
        cfg = Config()
        cfg.dataset.name, cfg.dataset.root, cfg.dataset.ann = "coco", str(tmp_path / "data"), str(ann)
        cfg.teacher.occlusion = occlusion
        return prepare_label(cfg, tmp_path / "out")

    service = prepare("off")
    with ShardWriter(tmp_path / "out", service.meta):
        pass
    assert prepare("off").meta.config_digest == service.meta.config_digest
    with pytest.raises(UserError, match="out: holds shards of another config"):
        prepare("joint")


