"""The toy generator: real Cityscapes layout, determinism, scene geometry, the hard cases, caching, CLI."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import ToyConfig
from pipeline.datasets.cityscapes import INSTANCE_LABEL_IDS, paint_polygons
from pipeline.datasets.toy import (BASELINE, GENERATOR_VERSION, Camera, ensure_toy, generate_toy, image_name,
                                   parse_size, read_toy_manifest, render_scene, toy_cache_dir, toy_manifest)
from pipeline.errors import ConfigError

SIZE = (128, 256)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return generate_toy(tmp_path_factory.mktemp("toy"), train=3, val=1, seed=0, size=SIZE)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_real_cityscapes_layout_and_names(toy):
    images = sorted(p.relative_to(toy).as_posix() for p in (toy / "leftImg8bit").rglob("*.png"))
    assert len(images) == 4
    pattern = re.compile(r"leftImg8bit/(train|val)/([a-z]+)/\2_\d{6}_\d{6}_leftImg8bit\.png")
    assert all(pattern.fullmatch(p) for p in images), images
    for rel in images:
        split, city, name = rel.split("/")[1:]
        base = name[: -len("_leftImg8bit.png")]
        gt = toy / "gtFine" / split / city
        polygons = json.loads((gt / f"{base}_gtFine_polygons.json").read_text())
        assert (polygons["imgHeight"], polygons["imgWidth"]) == SIZE
        assert all(set(o) == {"label", "polygon"} for o in polygons["objects"])
        instance = cv2.imread(str(gt / f"{base}_gtFine_instanceIds.png"), cv2.IMREAD_UNCHANGED)
        labels = cv2.imread(str(gt / f"{base}_gtFine_labelIds.png"), cv2.IMREAD_UNCHANGED)
        disparity = cv2.imread(str(toy / "disparity" / split / city / f"{base}_disparity.png"),
                               cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(toy / rel), cv2.IMREAD_UNCHANGED)
        assert image.shape == SIZE + (3,) and image.dtype == np.uint8
        assert instance.dtype == np.uint16 and disparity.dtype == np.uint16 and labels.dtype == np.uint8
        assert instance.shape == labels.shape == disparity.shape == SIZE
        # instanceIds agree with labelIds: labelId * 1000 + k for instances, the label id elsewhere.
        assert np.array_equal(np.where(instance >= 1000, instance // 1000, instance), labels)
        camera = json.loads((toy / "camera" / split / city / f"{base}_camera.json").read_text())
        assert camera["extrinsic"]["baseline"] == BASELINE
        assert camera["intrinsic"]["fx"] == pytest.approx(2262.52 * SIZE[1] / 2048)
        assert camera["intrinsic"]["v0"] == pytest.approx(513.137 * SIZE[0] / 1024)
    assert image_name("train", 4) == ("bochum", "bochum_000001_000019")


def test_instance_ids_png_follows_cityscapes_numbering(toy):
    # Cityscapes numbers instances per class in json order: the k-th car is 26000 + k.
    scene = render_scene(0, "train", 1, SIZE)
    count: dict[str, int] = {}
    for obj in scene.objects:
        if obj["label"] not in INSTANCE_LABEL_IDS:
            continue
        k = count.get(obj["label"], 0)
        count[obj["label"]] = k + 1
        value = INSTANCE_LABEL_IDS[obj["label"]] * 1000 + k
        assert (scene.instance_ids == value).any(), f"{obj['label']} {k} is not visible"


def test_same_seed_same_bytes_other_seed_differs(toy, tmp_path):
    again = generate_toy(tmp_path / "again", train=3, val=1, seed=0, size=SIZE)
    assert _files(again) == _files(toy)
    other = generate_toy(tmp_path / "other", train=3, val=1, seed=1, size=SIZE)
    first, second = _files(toy), _files(other)
    assert first.keys() == second.keys()
    images = [k for k in first if k.startswith("leftImg8bit")]
    assert all(first[k] != second[k] for k in images)


def test_image_does_not_depend_on_dataset_size(toy, tmp_path):
    small = generate_toy(tmp_path / "small", train=1, val=0, seed=0, size=SIZE)
    name = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert (small / name).read_bytes() == (toy / name).read_bytes()


def test_objects_stand_on_the_road_at_a_depth_matching_their_size():
    """Bottom row of an object's outline = ground-plane row of its depth; height = fy * H / Z."""
    height, width = 256, 512
    cam = Camera.for_size(height, width)
    checked = 0
    for index in range(4):
        scene = render_scene(3, "train", index, (height, width))
        for obj in scene.objects:
            if obj["label"] not in ("person", "car") or len(obj["polygon"]) < 3:
                continue
            polygon = np.asarray(obj["polygon"], np.int32)
            mask = paint_polygons(np.zeros((height, width), np.uint8), [polygon], [1]).astype(bool)
            visible = mask & (scene.instance_ids >= 1000)
            bottom = polygon[:, 1].max()
            if bottom >= height - 1 or polygon[:, 0].min() <= 0 or polygon[:, 0].max() >= width - 1:
                continue  # cut by the border
            # The farthest visible pixel: vehicle bodies bulge towards the camera by up to 0.3 m.
            z = float(scene.depth[visible].max())
            expected_bottom = cam.v0 + cam.fy * cam.height / z
            assert abs(bottom + 0.5 - expected_bottom) <= 1.5, (obj["label"], bottom, expected_bottom)
            tall = (polygon[:, 1].max() - polygon[:, 1].min() + 1) / (cam.fy / z)
            assert 1.2 < tall < 2.1, (obj["label"], tall)   # metres: cars 1.5, people 1.72 (+-1 px)
            checked += 1
    assert checked >= 5


def test_scenes_hold_the_hard_cases():
    height, width = 128, 256
    counts = {"classes": set(), "cut": 0, "small": 0, "occluded": 0, "groups": 0, "holes": 0}
    for index in range(6):
        scene = render_scene(0, "train", index, (height, width))
        for obj in scene.objects:
            label = obj["label"]
            polygon = np.asarray(obj["polygon"], np.int32)
            counts["groups"] += label.endswith("group")
            if label not in INSTANCE_LABEL_IDS:
                continue
            counts["classes"].add(label)
            full = paint_polygons(np.zeros((height, width), np.uint8), [polygon], [1]).astype(bool)
            labels = scene.label_ids[full]
            counts["occluded"] += bool((labels != INSTANCE_LABEL_IDS[label]).any())
            counts["cut"] += bool(polygon[:, 0].min() <= 0 or polygon[:, 0].max() >= width - 1
                                  or polygon[:, 1].max() >= height - 1)
            counts["small"] += bool(polygon[:, 1].max() - polygon[:, 1].min() < 32)
        # Invalid disparity beyond the sky (label 23): holes and the left band.
        counts["holes"] += int(((scene.disparity == 0) & (scene.label_ids != 23)).sum() > 0)
        assert (scene.depth[scene.disparity > 0] > 0).all()
    assert len(counts["classes"]) >= 5, counts
    assert counts["cut"] >= 6 and counts["small"] >= 6 and counts["occluded"] >= 6, counts
    assert counts["groups"] >= 1 and counts["holes"] == 6, counts


def test_camouflaged_object_matches_its_background_colour():
    """In each scene one object is painted like what lies behind it: along its outline the colour step
    is small while the depth step is large."""
    scene = render_scene(0, "train", 0, (256, 512))
    image = scene.image.astype(np.float32)
    found = False
    for obj in scene.objects:
        if obj["label"] not in INSTANCE_LABEL_IDS:
            continue
        mask = paint_polygons(np.zeros(scene.depth.shape, np.uint8), [np.asarray(obj["polygon"])], [1])
        ring = cv2.dilate(mask, np.ones((5, 5), np.uint8)).astype(bool) & ~mask.astype(bool)
        inner = mask.astype(bool) & ~cv2.erode(mask, np.ones((5, 5), np.uint8)).astype(bool)
        if ring.sum() < 20 or inner.sum() < 20:
            continue
        colour_step = np.abs(image[inner].mean(0) - image[ring].mean(0)).max()
        valid = scene.depth > 0
        depth_step = abs(np.median(scene.depth[inner & valid]) - np.median(scene.depth[ring & valid]))
        found |= colour_step < 12 and depth_step > 1.0
    assert found


def test_parse_size():
    assert parse_size("256x512") == (256, 512)
    for bad in ("256", "ax5", "16x16"):
        with pytest.raises(ConfigError, match="dataset.toy.size"):
            parse_size(bad)


def test_ensure_toy_generates_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BOXMASK_CACHE", str(tmp_path / "cache"))
    cfg = ToyConfig(train=1, val=1, seed=2, size="64x128")
    target = toy_cache_dir(cfg)
    assert target.parent == tmp_path / "cache" and "64x128" in target.name
    assert ensure_toy(cfg) == target
    stamp = {p: p.stat().st_mtime_ns for p in target.rglob("*.png")}
    assert len(stamp) == 2 * 4                      # image, instanceIds, labelIds, disparity per image
    assert ensure_toy(cfg) == target                # second call reuses it
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*.png")} == stamp
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]   # no temp folder left
    explicit = ToyConfig(train=1, val=0, size="64x128", cache_dir=str(tmp_path / "mine"))
    assert ensure_toy(explicit) == tmp_path / "mine"
    assert (tmp_path / "mine" / "leftImg8bit" / "train").is_dir()


def test_ensure_toy_loses_a_race_gracefully(tmp_path, monkeypatch):
    """Another process renames its copy into place first: ours is discarded and theirs is used."""
    import pipeline.datasets.toy as toy_module

    cfg = ToyConfig(train=1, val=0, size="64x128", cache_dir=str(tmp_path / "toy"))
    real = toy_module.generate_toy

    def racing(out, *args, **kwargs):
        real(tmp_path / "toy", *args, **kwargs)      # the other process finishes first
        (tmp_path / "toy" / "winner").write_text("")
        return real(out, *args, **kwargs)

    monkeypatch.setattr(toy_module, "generate_toy", racing)
    assert ensure_toy(cfg) == tmp_path / "toy"
    assert (tmp_path / "toy" / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_make_toy_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-toy", "--help"])
    assert exit_info.value.code == 0
    assert "--size" in capsys.readouterr().out
    assert main(["make-toy", "--out", str(tmp_path / "d"), "--train", "2", "--val", "1",
                 "--seed", "5", "--size", "64x128"]) == 0
    assert len(list((tmp_path / "d" / "leftImg8bit").rglob("*.png"))) == 3
    capsys.readouterr()
    assert main(["make-toy", "--out", str(tmp_path / "e"), "--size", "big"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--size" in err and "HxW" in err


def _make_toy(capsys, *args: str) -> tuple[int, str]:
    code = main(["make-toy", *args])
    return code, capsys.readouterr().err


def test_make_toy_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "toy"
    code, err = _make_toy(capsys, "--out", str(out), "--train", "1", "--val", "0", "--size", "64x128")
    assert code == 2 and err.count("\n") == 1
    assert err.strip() == f"error: {out}: cannot write the toy dataset here (Not a directory)"
    code, err = _make_toy(capsys, "--out", str(blocker), "--train", "1", "--val", "0", "--size", "64x128")
    assert code == 2 and err.strip() == f"error: {blocker}: exists and is not a folder; choose another --out"


def test_make_toy_write_error_during_generation_is_one_line(tmp_path, capsys, monkeypatch):
    import pipeline.commands.make_toy as make_toy

    bad = tmp_path / "d" / "leftImg8bit" / "x.png"

    def failing(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(bad))

    monkeypatch.setattr(make_toy, "generate_toy", failing)
    code, err = _make_toy(capsys, "--out", str(tmp_path / "d"), "--train", "1", "--size", "64x128")
    assert code == 2 and err.strip() == f"error: {bad}: cannot write the toy dataset (Permission denied)"


def test_make_toy_refuses_a_different_dataset_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "d"
    first = ["--out", str(out), "--train", "2", "--val", "1", "--seed", "5", "--size", "64x128"]
    assert _make_toy(capsys, *first)[0] == 0
    assert read_toy_manifest(out) == toy_manifest(2, 1, 5, (64, 128))
    before = _files(out)
    # The same arguments again: fine, same bytes.
    assert _make_toy(capsys, *first)[0] == 0
    assert _files(out) == before
    # Another seed, count or size: refused in one line, nothing touched.
    for change in (["--seed", "6"], ["--train", "3"], ["--size", "64x192"]):
        args = first + change
        code, err = _make_toy(capsys, *args)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {out}: already holds a different toy dataset (seed 5, 2 train + 1 val, "
                              f"64x128, generator v{GENERATOR_VERSION}; asked for ")
        assert "pass --overwrite" in err
        assert _files(out) == before
    # --overwrite deletes the old trees first: no image of the old dataset is left over.
    (out / "notes.txt").write_text("mine")
    assert _make_toy(capsys, "--out", str(out), "--train", "1", "--val", "0", "--seed", "6", "--size", "64x128",
                     "--overwrite")[0] == 0
    assert len(list((out / "leftImg8bit").rglob("*.png"))) == 1
    assert not (out / "leftImg8bit" / "val").exists() and not (out / "gtFine" / "val").exists()
    assert read_toy_manifest(out) == toy_manifest(1, 0, 6, (64, 128))
    assert (out / "notes.txt").read_text() == "mine"             # only the dataset folders are deleted
    assert _files(out) == {**_files(generate_toy(tmp_path / "ref", 1, 0, 6, (64, 128))), "notes.txt": b"mine"}


def test_make_toy_refuses_a_dataset_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "cs"
    (out / "gtFine" / "train").mkdir(parents=True)
    code, err = _make_toy(capsys, "--out", str(out), "--train", "1", "--val", "0", "--size", "64x128")
    assert code == 2 and "already holds a dataset make-toy did not write (gtFine without a valid toy.json)" in err
    assert not (out / "leftImg8bit").exists()


def test_toy_cache_folder_carries_the_generator_version(tmp_path, monkeypatch):
    import pipeline.datasets.toy as toy_module

    monkeypatch.setenv("BOXMASK_CACHE", str(tmp_path))
    cfg = ToyConfig(train=1, val=1, seed=2, size="64x128")
    current = toy_cache_dir(cfg)
    assert f"gen{GENERATOR_VERSION}-" in current.name
    monkeypatch.setattr(toy_module, "GENERATOR_VERSION", GENERATOR_VERSION + 1)
    assert toy_cache_dir(cfg) != current and f"gen{GENERATOR_VERSION + 1}-" in toy_cache_dir(cfg).name
