"""The Cityscapes loader on ``make-toy`` output: every polygon instance accounted for, tight visible-mask
boxes, depth from disparity, the instanceIds fallback, laziness, and every bad-input case."""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.datasets.cityscapes import (CITYSCAPES_CATEGORIES, INSTANCE_LABEL_IDS, CityscapesDataset,
                                          disparity_to_depth)
from pipeline.datasets.toy import CITIES, generate_toy, render_scene
from pipeline.errors import InputError

SIZE = (128, 256)
SEED = 0
TRAIN = 4


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_toy(tmp_path_factory.mktemp("toy"), train=TRAIN, val=1, seed=SEED, size=SIZE)


@pytest.fixture
def copy(toy, tmp_path) -> Path:
    """A private copy of the toy dataset to damage."""
    return Path(shutil.copytree(toy, tmp_path / "root"))


def _gt(root: Path, image_id: str, suffix: str, split: str = "train") -> Path:
    city = image_id.split("_")[0]
    folder = {"polygons.json": "gtFine", "instanceIds.png": "gtFine", "disparity.png": "disparity",
              "camera.json": "camera", "leftImg8bit.png": "leftImg8bit"}[suffix]
    name = f"{image_id}_gtFine_{suffix}" if folder == "gtFine" else f"{image_id}_{suffix}"
    return root / folder / split / city / name


def _summary(dataset) -> dict:
    """What labeling sees of each image, for 'nothing else was lost' comparisons."""
    return {s.image_id: (s.boxes.tolist(), s.classes.tolist(), s.instance_ids.tolist(),
                         s.ignore_boxes.tolist(), s.has_depth) for s in dataset}


def test_categories_are_the_eight_cityscapes_instance_classes():
    assert [(c.id, c.name) for c in CITYSCAPES_CATEGORIES] == [
        (24, "person"), (25, "rider"), (26, "car"), (27, "truck"), (28, "bus"), (31, "train"),
        (32, "motorcycle"), (33, "bicycle")]


def test_every_polygon_instance_is_accounted_for(toy):
    dataset = CityscapesDataset(toy, "train")
    assert len(dataset) == TRAIN and dataset.has_depth
    assert dataset.rejects == []
    for sample in dataset:
        objects = json.loads(_gt(toy, sample.image_id, "polygons.json").read_text())["objects"]
        instances = [o for o in objects if o["label"] in INSTANCE_LABEL_IDS]
        groups = [o for o in objects if o["label"].endswith("group")]
        assert len(sample.boxes) == len(instances)
        assert sample.instance_ids.tolist() == list(range(len(instances)))
        assert sample.classes.tolist() == [INSTANCE_LABEL_IDS[o["label"]] for o in instances]
        assert sample.ignore_classes.tolist() == [INSTANCE_LABEL_IDS[o["label"][:-5]] for o in groups]
        assert sample.file_name == f"leftImg8bit/train/{sample.image_id.split('_')[0]}/" \
                                   f"{sample.image_id}_leftImg8bit.png"
        assert sample.load_image().shape == SIZE + (3,)
    assert sum(len(s.ignore_boxes) for s in dataset) >= 1, "the fixture should hold a group region"


def test_box_is_the_tight_box_of_the_visible_mask(toy):
    dataset = CityscapesDataset(toy, "train")
    for sample in dataset:
        masks = dataset._gt_masks(sample)
        instance_png = cv2.imread(str(_gt(toy, sample.image_id, "instanceIds.png")), cv2.IMREAD_UNCHANGED)
        assert sorted(masks) == sample.instance_ids.tolist()
        coverage = np.zeros(SIZE, int)
        for instance_id, box in zip(sample.instance_ids, sample.boxes):
            mask = masks[int(instance_id)]
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            # The visible mask is exactly one instance of the instanceIds PNG.
            values = np.unique(instance_png[mask])
            assert len(values) == 1 and np.array_equal(instance_png == values[0], mask)
            coverage += mask
        assert coverage.max() <= 1, "visible masks overlap"
        for box, ignore in zip(sample.ignore_boxes, dataset._gt_ignore_masks(sample)):
            ys, xs = np.nonzero(ignore)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_depth_from_disparity_matches_the_true_depth_within_one_percent(toy):
    dataset = CityscapesDataset(toy, "train")
    for sample in dataset:
        city, seq, _ = sample.image_id.split("_")
        index = int(seq) * len(CITIES["train"]) + CITIES["train"].index(city)
        scene = render_scene(SEED, "train", index, SIZE)
        assert np.array_equal(scene.image, sample.load_image())
        depth = sample.load_depth()
        assert depth.dtype == np.float32 and depth.shape == SIZE
        valid = scene.disparity > 0
        assert valid.mean() > 0.5
        assert np.all(depth[~valid] == 0)
        relative = np.abs(depth[valid] - scene.depth[valid]) / scene.depth[valid]
        assert relative.max() < 0.01, relative.max()


def test_disparity_to_depth_formula():
    p = np.array([[0, 1, 257, 2561]], np.uint16)      # invalid, zero disparity, d = 1, d = 10
    depth = disparity_to_depth(p, baseline=0.2, fx=1000.0)
    np.testing.assert_allclose(depth, [[0, 0, 200.0, 20.0]], rtol=1e-6)


def test_instance_ids_png_fallback_gives_the_same_instances(copy):
    from_json = CityscapesDataset(copy, "train")
    json_masks = {s.image_id: from_json._gt_masks(s) for s in from_json}
    json_ignore = {s.image_id: from_json._gt_ignore_masks(s) for s in from_json}
    for path in (copy / "gtFine").rglob("*_polygons.json"):
        path.unlink()
    from_png = CityscapesDataset(copy, "train")
    assert from_png.rejects == [] and len(from_png) == len(from_json)
    for a, b in zip(from_json, from_png):
        assert a.image_id == b.image_id
        json_side = sorted((c, tuple(box), json_masks[a.image_id][int(i)].tobytes())
                           for c, box, i in zip(a.classes.tolist(), a.boxes.tolist(), a.instance_ids))
        png_masks = from_png._gt_masks(b)
        png_side = sorted((c, tuple(box), png_masks[int(i)].tobytes())
                          for c, box, i in zip(b.classes.tolist(), b.boxes.tolist(), b.instance_ids))
        assert json_side == png_side
        # Group regions: the same pixels and classes (the PNG splits a group an occluder cuts in two).
        assert set(a.ignore_classes.tolist()) == set(b.ignore_classes.tolist())
        union = np.zeros(SIZE, bool)
        for mask in json_ignore[a.image_id]:
            union |= mask
        png_union = np.zeros(SIZE, bool)
        for box, mask in zip(b.ignore_boxes, from_png._gt_ignore_masks(b)):
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            png_union |= mask
        assert np.array_equal(union, png_union)


def test_construction_decodes_no_image(toy, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an image was decoded while building the dataset")

    monkeypatch.setattr(cv2, "imdecode", forbidden)
    dataset = CityscapesDataset(toy, "train")
    assert len(dataset) == TRAIN
    with pytest.raises(AssertionError):
        dataset[0].load_image()


def test_missing_depth_folders_mean_no_depth_and_no_rejects(copy):
    shutil.rmtree(copy / "disparity")
    shutil.rmtree(copy / "camera")
    dataset = CityscapesDataset(copy, "train")
    assert dataset.rejects == [] and not dataset.has_depth
    assert all(s.load_depth() is None for s in dataset)


def test_bad_root_or_split(tmp_path, toy):
    with pytest.raises(InputError, match="no such folder"):
        CityscapesDataset(tmp_path, "train")
    with pytest.raises(InputError, match="'test' split"):
        CityscapesDataset(toy, "test")


# --------------------------------------------------------------------------------------------- bad input

def _edit_objects(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data["objects"])
    path.write_text(json.dumps(data))


def _first_instance(objects, label=None) -> int:
    return next(i for i, o in enumerate(objects) if o["label"] in INSTANCE_LABEL_IDS
                and (label is None or o["label"] == label))


def _damage(root: Path, image_id: str, case: str) -> tuple[Path, str]:
    """Damage one file of ``image_id``; returns (file the error must name, words it must contain)."""
    if case == "unreadable image":
        path = _gt(root, image_id, "leftImg8bit.png")
        path.write_bytes(b"this is not a png")
        return path, "unreadable image"
    if case == "missing json":
        path = _gt(root, image_id, "polygons.json")
        path.unlink()
        _gt(root, image_id, "instanceIds.png").unlink()
        return path, "file not found"
    if case == "malformed json":
        path = _gt(root, image_id, "polygons.json")
        path.write_text('{"imgHeight": 128, "imgWidth": 256, "objects": [')
        return path, "malformed json at line 1"
    if case == "json without objects":
        path = _gt(root, image_id, "polygons.json")
        path.write_text('{"imgHeight": 128}')
        return path, "no 'objects' list"
    if case in ("box x2 <= x1", "box outside the image"):
        path = _gt(root, image_id, "polygons.json")

        def edit(objects):
            k = _first_instance(objects)
            if case == "box x2 <= x1":
                objects[k]["polygon"] = [[40, 10], [40, 30], [40, 50]]
            else:
                objects[k]["polygon"] = [[300, 10], [340, 10], [340, 50]]
        _edit_objects(path, edit)
        return path, ("box [40, 10, 40, 50] has x2 <= x1" if case == "box x2 <= x1"
                      else "box [300, 10, 340, 50] lies outside the 256x128 image")
    if case == "missing disparity":
        path = _gt(root, image_id, "disparity.png")
        path.unlink()
        return path, "disparity file not found"
    if case == "missing camera":
        path = _gt(root, image_id, "camera.json")
        path.unlink()
        return path, "camera file not found"
    if case == "malformed camera":
        path = _gt(root, image_id, "camera.json")
        path.write_text('{"extrinsic": {}, "intrinsic": {"fx": 10}}')
        return path, "lacks numeric extrinsic.baseline"
    raise AssertionError(case)


IMAGE_CASES = ["unreadable image", "missing json", "malformed json", "json without objects"]
BOX_CASES = ["box x2 <= x1", "box outside the image"]
DEPTH_CASES = ["missing disparity", "missing camera", "malformed camera"]


@pytest.mark.parametrize("case", IMAGE_CASES + BOX_CASES + DEPTH_CASES)
def test_bad_input_is_one_line_naming_file_and_problem(toy, copy, case):
    baseline = _summary(CityscapesDataset(toy, "train"))
    victim = sorted(baseline)[1]
    path, words = _damage(copy, victim, case)

    lenient = CityscapesDataset(copy, "train")
    assert len(lenient.rejects) == 1
    message = str(lenient.rejects[0])
    assert "\n" not in message and str(path) in message and words in message, message
    seen = _summary(lenient)
    # Nothing else lost: every other image is exactly as before.
    assert {k: v for k, v in seen.items() if k != victim} == {k: v for k, v in baseline.items()
                                                              if k != victim}
    boxes, classes, ids, ignore, has_depth = baseline[victim]
    if case in IMAGE_CASES:
        assert victim not in seen
    elif case in BOX_CASES:
        # The bad box is dropped; the image and its other instances (same ids) stay.
        assert seen[victim][2] == ids[1:] and seen[victim][0] == boxes[1:] and seen[victim][4]
    else:
        # The image stays, without depth, and the reject says so.
        assert seen[victim] == (boxes, classes, ids, ignore, False)
        assert lenient.get(victim).load_depth() is None
        assert message.endswith("; image kept without depth"), message

    with pytest.raises(InputError) as raised:
        CityscapesDataset(copy, "train", strict=True)
    # Strict mode stops: the same message, without the "kept" part.
    assert str(raised.value) == message.removesuffix("; image kept without depth")


def test_strict_mode_stops_at_the_first_bad_input(toy, copy):
    ids = sorted(_summary(CityscapesDataset(toy, "train")))
    first, _ = _damage(copy, ids[1], "malformed json")
    second, _ = _damage(copy, ids[2], "missing disparity")
    lenient = CityscapesDataset(copy, "train")
    assert [r.where for r in lenient.rejects] == [str(first), str(second)]
    with pytest.raises(InputError) as raised:
        CityscapesDataset(copy, "train", strict=True)
    assert raised.value.where == str(first)


def test_corrupt_image_body_fails_at_load_naming_the_file(copy, capfd):
    dataset = CityscapesDataset(copy, "train")
    sample = dataset[0]
    path = copy / sample.file_name
    path.write_bytes(path.read_bytes()[:200])          # header intact, pixel data cut
    capfd.readouterr()
    with pytest.raises(InputError) as raised:
        CityscapesDataset(copy, "train")[0].load_image()
    assert raised.value.where == str(path) and "unreadable image" in raised.value.problem
    # The InputError is the whole story: OpenCV's and libpng's own warnings do not reach stderr.
    assert capfd.readouterr().err == ""


def test_index_progress_bar_only_on_a_terminal(toy, monkeypatch, capsys):
    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    CityscapesDataset(toy, "train")
    assert capsys.readouterr().err == ""               # captured (not a terminal): silent
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    CityscapesDataset(toy, "train")
    shown = terminal.getvalue()
    assert "index cityscapes/train" in shown and f"/{TRAIN}" in shown
    assert "\n" not in shown                           # cleared when done, no lines left behind


def test_fully_covered_polygon_is_recorded_not_fatal(toy, copy):
    """A valid json may hold an instance that later polygons cover entirely: it has no box, is listed
    as a reject, and even strict mode keeps going (the file is not bad)."""
    victim = sorted(_summary(CityscapesDataset(toy, "train")))[0]
    path = _gt(copy, victim, "polygons.json")
    # A person drawn before the sky polygon (the whole frame) is covered by everything after it.
    _edit_objects(path, lambda objects: objects.insert(0, {"label": "person",
                                                           "polygon": [[5, 5], [20, 5], [20, 40]]}))
    for strict in (False, True):
        dataset = CityscapesDataset(copy, "train", strict=strict)
        sample = dataset.get(victim)
        assert len(dataset.rejects) == 1 and "object 0 (person)" in dataset.rejects[0].where
        assert "no visible pixels" in dataset.rejects[0].problem
        # The covered person took instance id 0; the others keep their ids, shifted by one.
        assert sample.instance_ids.tolist() == list(range(1, len(sample.boxes) + 1))


def test_size_mismatch_between_json_and_image(copy):
    victim = sorted(p.name for p in (copy / "gtFine" / "train").rglob("*_polygons.json"))[0]
    path = next((copy / "gtFine" / "train").rglob(victim))
    data = json.loads(path.read_text())
    data["imgWidth"] = 512
    path.write_text(json.dumps(data))
    dataset = CityscapesDataset(copy, "train")
    assert len(dataset) == TRAIN - 1
    assert "imgHeight/imgWidth 128x512 differ from the image's 128x256" in str(dataset.rejects[0])
