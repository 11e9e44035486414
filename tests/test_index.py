"""The dataset index (`pipeline.index`, `pipeline index`): written by streaming, row for row what the loaders read.

Cityscapes (toy) and COCO indexes are compared with ``CityscapesDataset`` / ``CocoDataset``: same images in the
same order, same boxes, classes, instance ids, ignore regions, depth and rejects. OpenImages CSVs are checked
against hand-computed rows, with every kind of bad row. Hash buckets are made few, so that images share buckets and
the merge back into source order is exercised. No step may load a whole annotation file: the COCO build runs with
``json.load`` and the loader's ``read_json`` disabled.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.dataset as pads
import pytest

from coco_helpers import rect_polygon, write_coco, write_image
from pipeline.config import DatasetConfig
from pipeline.datasets import build_dataset, build_index
from pipeline.datasets.cityscapes import CityscapesDataset
from pipeline.datasets.coco import CocoDataset
from pipeline.datasets.toy import generate_toy
from pipeline.errors import InputError, UserError
from pipeline.index import INDEX_META, INDEX_SCHEMA, iter_index, read_meta

REPO = Path(__file__).resolve().parents[1]


def _same_rows(rows, samples) -> None:
    samples = list(samples)
    assert [r.image_id for r in rows] == [s.image_id for s in samples]
    for r, s in zip(rows, samples):
        assert (r.file_name, r.height, r.width) == (s.file_name, s.height, s.width)
        for name in ("boxes", "classes", "instance_ids", "ignore_boxes", "ignore_classes"):
            got, want = getattr(r, name), getattr(s, name)
            assert got.dtype == want.dtype and np.array_equal(got, want), (s.image_id, name)
        assert (r.depth_file is not None) == s.has_depth


def _rejects(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "_rejects.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_toy(tmp_path_factory.mktemp("toy"), train=5, val=1, seed=0, size=(96, 192))


def test_a_cityscapes_index_is_the_loaders_rows_in_parts(toy, tmp_path):
    cfg = DatasetConfig(name="cityscapes", root=str(toy))
    meta = build_index(cfg, tmp_path / "idx", part_images=2)
    dataset = CityscapesDataset(toy, "train")
    rows = list(iter_index(tmp_path / "idx"))
    _same_rows(rows, dataset)
    assert [p["images"] for p in meta["parts"]] == [2, 2, 1] and meta["images"] == 5
    assert meta["boxes"] == sum(len(s.boxes) for s in dataset) and meta["rejects"] == 0
    assert meta["categories"] == [[c.id, c.name] for c in dataset.categories]
    assert meta["fingerprint"] == dataset.fingerprint()     # so labels from either resume the other's shards
    # Depth: the disparity file and the camera's baseline and fx, which give the loader's depth exactly, and the
    # row's own Sample reads the loader's pixels and depth.
    for r, s in zip(rows, dataset):
        assert r.depth_kind == "disparity" and (toy / r.depth_file).is_file()
        from pipeline.datasets.cityscapes import load_depth
        assert np.array_equal(load_depth(str(toy / r.depth_file), *r.depth_params, r.height, r.width), s.load_depth())
        again = r.to_sample(toy)
        assert np.array_equal(again.load_depth(), s.load_depth()) and np.array_equal(again.load_image(), s.load_image())
    # Users read it with plain pyarrow.
    table = pads.dataset(str(tmp_path / "idx"), format="parquet").to_table()
    assert table.schema.equals(INDEX_SCHEMA) and table.num_rows == 5


def test_cityscapes_rejects_go_to_the_rejects_file_and_the_rest_is_indexed(toy, tmp_path):
    root = Path(shutil.copytree(toy, tmp_path / "root"))
    broken = sorted((root / "gtFine" / "train").glob("*/*_polygons.json"))[1]
    broken.write_text("{not json")
    (broken.parent / broken.name.replace("polygons.json", "instanceIds.png")).unlink()
    build_index(DatasetConfig(name="cityscapes", root=str(root)), tmp_path / "idx")
    dataset = CityscapesDataset(root, "train")
    _same_rows(list(iter_index(tmp_path / "idx")), dataset)
    assert [(r["where"], r["problem"]) for r in _rejects(tmp_path / "idx")] == \
        [(x.where, x.problem) for x in dataset.rejects]
    assert len(dataset) == 4 and len(dataset.rejects) == 1


def _messy_coco(root: Path) -> Path:
    """Six images, annotations interleaved across images (as real files are), with bad items of every kind."""
    images = [{"id": k, "file_name": f"images/{k}.png", "height": 40, "width": 60} for k in range(1, 6)]
    images.append({"id": 6, "file_name": "images/missing.png", "height": 40, "width": 60})
    images.append({"id": 3, "file_name": "images/3.png", "height": 40, "width": 60})           # id twice
    anns = []
    for k in range(24):
        image = 1 + (k * 7) % 5
        anns.append({"id": 100 + k, "image_id": image, "category_id": 1 if k % 3 else 3,
                     "bbox": [1.0 + k % 5, 2.0, 10.0 + k % 7, 12.0], "iscrowd": int(k % 11 == 4),
                     "segmentation": rect_polygon(1, 2, 11, 14)})
    anns += [{"id": 200, "image_id": 2, "category_id": 1, "bbox": [50.0, 2.0, 30.0, 5.0]},     # outside
             {"id": 201, "image_id": 4, "category_id": 1, "bbox": [5.0, 2.0, 0.0, 5.0]},       # zero width
             {"id": 202, "image_id": 9, "category_id": 1, "bbox": [5.0, 2.0, 4.0, 5.0]},       # unknown image
             {"id": 203, "image_id": 1, "category_id": 7, "bbox": [5.0, 2.0, 4.0, 5.0]},       # unknown class
             {"id": 204, "image_id": 6, "category_id": 1, "bbox": [5.0, 2.0, 4.0, 5.0]},       # rejected image
             {"id": 205, "image_id": 5, "category_id": 3, "bbox": [3.0, 3.0, 9.0, 9.0]},
             "not an object"]
    ann = write_coco(root, [i for i in images if i["id"] != 6 and i is not images[-1]], [])
    write_image(root / "images" / "3.png", 40, 60, seed=3)
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]}))
    return ann


def test_a_coco_index_streams_the_file_and_matches_the_loader(tmp_path, monkeypatch):
    ann = _messy_coco(tmp_path / "coco")
    dataset = CocoDataset(tmp_path / "coco", ann)
    # No step may read the whole file into one object: the loader's reader and json.load are off limits.
    import pipeline.datasets.coco as coco_module

    def refuse(*args, **kwargs):
        raise AssertionError("the whole annotation file was loaded")
    monkeypatch.setattr(coco_module, "read_json", refuse)
    monkeypatch.setattr(json, "load", refuse)
    cfg = DatasetConfig(name="coco", root=str(tmp_path / "coco"), ann=str(ann))
    meta = build_index(cfg, tmp_path / "idx", part_images=2, buckets=3)
    rows = list(iter_index(tmp_path / "idx"))
    _same_rows(rows, dataset)
    assert sorted((r["where"], r["problem"]) for r in _rejects(tmp_path / "idx")) == \
        sorted((x.where, x.problem) for x in dataset.rejects)
    assert meta["rejects"] == len(dataset.rejects) >= 6
    assert meta["categories"] == [[1, "person"], [3, "car"]]
    assert meta["fingerprint"] == dataset.fingerprint()
    # Instance ids are the annotations' slots within their image in file order, rejected ones included.
    five = next(r for r in rows if r.image_id == "5")
    assert five.instance_ids[-1] == sum(1 for a in json.loads(ann.read_text())["annotations"]
                                        if isinstance(a, dict) and a["image_id"] == 5) - 1


@pytest.mark.parametrize("split", ["train", "holdout"])
def test_a_coco_index_with_a_holdout_fraction_holds_the_images_of_its_split_as_the_loader(tmp_path, split):
    ann = _messy_coco(tmp_path / "coco")
    dataset = CocoDataset(tmp_path / "coco", ann, split=split, holdout=0.4)
    cfg = DatasetConfig(name="coco", root=str(tmp_path / "coco"), ann=str(ann), split=split, holdout=0.4)
    meta = build_index(cfg, tmp_path / "idx", part_images=2, buckets=3)
    rows = list(iter_index(tmp_path / "idx"))
    other = CocoDataset(tmp_path / "coco", ann, split="holdout" if split == "train" else "train", holdout=0.4)
    everything = CocoDataset(tmp_path / "coco", ann)
    assert rows and len(other) and {r.image_id for r in rows} == set(everything.image_ids()) - set(other.image_ids())
    _same_rows(rows, dataset)
    assert meta["fingerprint"] == dataset.fingerprint()
    with pytest.raises(Exception, match="holdout"):
        build_index(DatasetConfig(name="toy", holdout=0.4), tmp_path / "toy-idx")


def test_coco_with_depth_keeps_its_file_and_scale(tmp_path):
    root = tmp_path / "coco"
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30, "depth_file": "a_depth.npy",
               "depth_scale": 0.5}]
    ann = write_coco(root, images, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2.0, 2.0, 8.0, 8.0]}])
    np.save(root / "a_depth.npy", np.full((20, 30), 7.0, np.float32))
    build_index(DatasetConfig(name="coco", root=str(root), ann=str(ann)), tmp_path / "idx")
    (row,) = list(iter_index(tmp_path / "idx"))
    assert (row.depth_file, row.depth_kind, row.depth_params) == ("a_depth.npy", "metres", (0.5,))
    assert np.array_equal(row.to_sample(root).load_depth(), np.full((20, 30), 3.5, np.float32))


def test_a_malformed_coco_file_is_one_line_and_leaves_no_index(tmp_path):
    root = tmp_path / "coco"
    ann = write_coco(root, [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}], [])
    ann.write_text(ann.read_text()[:-20])
    with pytest.raises(InputError, match="malformed json") as err:
        build_index(DatasetConfig(name="coco", root=str(root), ann=str(ann)), tmp_path / "idx")
    assert str(ann) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "idx" / INDEX_META).exists()
    with pytest.raises(InputError, match="no dataset index here"):
        read_meta(tmp_path / "idx")


# OpenImages: the real CSV layout (oidv6-train-annotations-bbox.csv and class-descriptions-boxable.csv).
BOX_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,"
              "IsDepiction,IsInside")


def _jpeg(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), 120, np.uint8))


def _openimages(root: Path) -> tuple[Path, Path]:
    images = root / "train"
    for image_id, (h, w) in {"000a1": (40, 80), "00b2c": (60, 30), "0c3d4": (50, 50)}.items():
        _jpeg(images / f"{image_id}.jpg", h, w)
    classes = root / "class-descriptions-boxable.csv"
    classes.write_text("/m/01g317,Person\n/m/0k4j,Car\n/m/04yx4,Man\n")
    rows = [
        "00b2c,xclick,/m/01g317,1,0.1,0.5,0.2,0.6,0,0,0,0,0",      # 00b2c slot 0
        "000a1,xclick,/m/0k4j,1,0.0,0.5,0.0,0.5,0,0,0,0,0",        # 000a1 slot 0
        "000a1,xclick,/m/01g317,1,0.25,1.0,0.5,1.0,1,0,1,0,0",     # 000a1 slot 1: a group box (crowd)
        "00b2c,xclick,/m/04yx4,1,0.3,0.3,0.2,0.6,0,0,0,0,0",       # 00b2c slot 1: zero-area
        "000a1,xclick,/m/09xyz,1,0.1,0.2,0.1,0.2,0,0,0,0,0",       # 000a1 slot 2: unknown class
        "ffff9,xclick,/m/0k4j,1,0.1,0.2,0.1,0.2,0,0,0,0,0",        # no image file
        "00b2c,xclick,/m/0k4j,1,0.5,1.2,0.1,0.9,0,0,0,0,0",        # 00b2c slot 2: outside the image
        "0c3d4,activemil,/m/04yx4,1,0.2,0.6,0.2,0.8,0,1,0,0,0",    # 0c3d4 slot 0
        "000a1,xclick,/m/04yx4,1,0.5,0.75,0.25,0.5,0,0,0,0,0",     # 000a1 slot 3
    ]
    boxes = root / "oidv6-train-annotations-bbox.csv"
    boxes.write_text(BOX_HEADER + "\n" + "\n".join(rows) + "\n")
    return boxes, classes


def test_an_openimages_csv_becomes_index_rows_and_rejects(tmp_path):
    boxes, classes = _openimages(tmp_path / "oi")
    cfg = DatasetConfig(name="openimages", root=str(tmp_path / "oi" / "train"), ann=str(boxes), classes=str(classes))
    meta = build_index(cfg, tmp_path / "idx", part_images=2, buckets=2)
    rows = {r.image_id: r for r in iter_index(tmp_path / "idx")}
    # Images in the order of their first box in the file; the one without an image file is rejected.
    assert [r.image_id for r in iter_index(tmp_path / "idx")] == ["00b2c", "000a1", "0c3d4"]
    a = rows["000a1"]
    assert (a.file_name, a.height, a.width) == ("000a1.jpg", 40, 80)
    assert np.allclose(a.boxes, [[0, 0, 40, 20], [40, 10, 60, 20]]) and a.boxes.dtype == np.float32
    assert a.classes.tolist() == [2, 3] and a.instance_ids.tolist() == [0, 3]
    assert np.allclose(a.ignore_boxes, [[20, 20, 80, 40]]) and a.ignore_classes.tolist() == [1]
    b = rows["00b2c"]
    assert np.allclose(b.boxes, [[3, 12, 15, 36]]) and b.instance_ids.tolist() == [0] and len(b.ignore_boxes) == 0
    assert rows["0c3d4"].classes.tolist() == [3]
    assert meta["categories"] == [[1, "Person"], [2, "Car"], [3, "Man"]]
    problems = [(Path(r["where"]).name, r["problem"]) for r in _rejects(tmp_path / "idx")]
    assert len(problems) == 4 == meta["rejects"]
    text = "\n".join(p for _, p in problems)
    assert "row 5 (box 1 of image 00b2c): zero-area box" in text
    assert "row 6 (box 2 of image 000a1): unknown LabelName '/m/09xyz'" in text
    assert "row 8 (box 2 of image 00b2c): box" in text and "lies outside the 30x60 image" in text
    assert ("ffff9.jpg", "image file not found; its 1 box(es) are skipped") in problems
    assert meta["images"] == 3 and meta["boxes"] == 4


def test_openimages_strict_stops_at_the_first_bad_row_and_writes_no_index(tmp_path):
    boxes, classes = _openimages(tmp_path / "oi")
    cfg = DatasetConfig(name="openimages", root=str(tmp_path / "oi" / "train"), ann=str(boxes), classes=str(classes),
                        strict=True)
    with pytest.raises(InputError):
        build_index(cfg, tmp_path / "idx")
    assert not (tmp_path / "idx" / INDEX_META).exists() and not (tmp_path / "idx" / ".scratch").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda b, c: b.write_text("ImageID,LabelName,XMin\n1,/m/0,0.1\n"), "no column XMax, YMin, YMax"),
    (lambda b, c: c.unlink(), "class descriptions file not found"),
    (lambda b, c: c.write_text("/m/0k4j,Car\n/m/0k4j,Auto\n"), "class /m/0k4j is listed twice"),
    (lambda b, c: b.unlink(), "boxes file not found"),
])
def test_bad_openimages_files_are_one_line_errors(tmp_path, damage, message):
    boxes, classes = _openimages(tmp_path / "oi")
    damage(boxes, classes)
    cfg = DatasetConfig(name="openimages", root=str(tmp_path / "oi" / "train"), ann=str(boxes), classes=str(classes))
    with pytest.raises(InputError, match=message) as err:
        build_index(cfg, tmp_path / "idx")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "idx" / INDEX_META).exists()


def test_openimages_is_indexed_not_loaded(tmp_path):
    with pytest.raises(UserError, match="pipeline index"):
        build_dataset(DatasetConfig(name="openimages", root=str(tmp_path), ann="b.csv", classes="c.csv"))


def test_building_again_replaces_the_old_index(toy, tmp_path):
    cfg = DatasetConfig(name="cityscapes", root=str(toy))
    build_index(cfg, tmp_path / "idx", part_images=1)
    meta = build_index(cfg, tmp_path / "idx", part_images=3)
    assert sorted(p.name for p in (tmp_path / "idx").glob("part-*.parquet")) == [p["file"] for p in meta["parts"]]
    assert len(list(iter_index(tmp_path / "idx"))) == 5


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_pipeline_index_on_openimages_and_its_errors(tmp_path):
    boxes, classes = _openimages(tmp_path / "oi")
    out = tmp_path / "idx"
    done = _cli("index", "--dataset", "openimages", "--data-root", str(tmp_path / "oi" / "train"), "--ann", str(boxes),
                "--classes", str(classes), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "indexed 3 images (4 boxes, 3 classes) into 1 parts" in done.stdout and "4 rejected items" in done.stdout
    missing = _cli("index", "--dataset", "openimages", "--data-root", str(tmp_path), "--ann", str(boxes),
                   "--out", str(out))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "--classes" in missing.stderr
    assert _cli("index", "--help").returncode == 0


def test_the_cli_and_pipeline_index_do_not_load_torch():
    # The index driver streams whole datasets: torch alone would be ~600 MiB of its memory.
    code = ("import sys, pipeline.cli, pipeline.commands.index; pipeline.cli.build_parser(); "
            "import pipeline.datasets, pipeline.config; "
            "sys.exit(1 if 'torch' in sys.modules or 'ray.train' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_labeling_an_index_without_a_config_takes_the_shipped_config_of_its_dataset_kind(tmp_path):
    from pipeline.cli import build_parser
    from pipeline.commands.label import label_config
    from pipeline.config import config_path_for, load_config

    ann = _messy_coco(tmp_path / "coco")
    build_index(DatasetConfig(name="coco", root=str(tmp_path / "coco"), ann=str(ann)), tmp_path / "coco-idx")
    boxes, classes = _openimages(tmp_path / "oi")
    build_index(DatasetConfig(name="openimages", root=str(tmp_path / "oi" / "train"), ann=str(boxes),
                              classes=str(classes)), tmp_path / "oi-idx")

    def config(*argv):
        return label_config(build_parser().parse_args(["label", "--out", str(tmp_path / "out"), *argv]))

    coco, toy = load_config(config_path_for("coco")), load_config(config_path_for("toy"))
    assert coco.teacher != toy.teacher                   # else this test could not tell them apart
    assert config("--index", str(tmp_path / "coco-idx")).teacher == coco.teacher
    assert config("--index", str(tmp_path / "oi-idx")).teacher == toy.teacher   # no shipped OpenImages config
    assert config("--index", str(tmp_path / "coco-idx"), "--config", str(config_path_for("toy"))).teacher == \
        toy.teacher
    assert config("--index", str(tmp_path / "coco-idx"), "--dataset", "toy").teacher == toy.teacher
    with pytest.raises(UserError, match="nowhere"):
        config("--index", str(tmp_path / "nowhere"))
