"""``pipeline inspect`` and ``pipeline export-coco`` on a shard directory written by ``ShardWriter`` (no Ray)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

import labelkit
from pipeline.cli import main
from pipeline.commands.export_coco import export_coco
from pipeline.commands.inspect import summarize
from pipeline.errors import UserError
from pipeline.render import overlay, palette
from pipeline.shards import ShardMeta, ShardWriter, encode_rle, rows_to_table


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Shards of a ``labelkit`` dataset with random (non-box) masks; returns (dir, data root, masks by key)."""
    tmp = tmp_path_factory.mktemp("shards")
    root = labelkit.write_folder_dataset(tmp / "data", n=6)
    dataset = labelkit.FolderDataset(str(root))
    meta = ShardMeta(dataset="folder", split="train", data_root=str(root),
                     classes=[{"id": c.id, "name": c.name} for c in dataset.categories],
                     config_digest="x", teacher="box-prior", round=1)
    rng = np.random.default_rng(3)
    masks = {}
    with ShardWriter(tmp / "out", meta, shard_rows=3) as w:
        for s in dataset:
            rows = []
            for k, (box, cls) in enumerate(zip(s.boxes, s.classes)):
                mask = rng.random((s.height, s.width)) > 0.7
                masks[s.image_id, k] = mask
                rows.append({"image_id": s.image_id, "file_name": s.file_name, "height": s.height,
                             "width": s.width, "instance_id": k, "category_id": int(cls),
                             "category": dataset.category_name(cls), "box": [float(v) for v in box],
                             "mask_rle": encode_rle(mask), "score": float(rng.random()), "round": 1,
                             "teacher": "box-prior", "correspondences": []})
            empty = None if rows else {"image_id": s.image_id, "file_name": s.file_name,
                                       "height": s.height, "width": s.width}
            w.add(s.image_id, rows_to_table(rows), empty)
        w.reject("im9", "img-009.png", "unreadable image", "load")
    return tmp / "out", root, masks, dataset


def test_export_coco_loads_in_pycocotools_and_masks_round_trip_bit_exactly(shard_dir, tmp_path, capsys):
    out, _, masks, dataset = shard_dir
    assert main(["export-coco", str(out), "--out", str(tmp_path / "pseudo.json")]) == 0
    assert "6 images" in capsys.readouterr().out
    coco = COCO(str(tmp_path / "pseudo.json"))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["car", "person"]
    assert len(coco.getImgIds()) == 6                        # the image without boxes is listed too
    by_dataset_id = {img["dataset_image_id"]: img for img in coco.loadImgs(coco.getImgIds())}
    assert len(coco.getAnnIds()) == len(masks)
    for (image_id, k), mask in masks.items():
        img = by_dataset_id[image_id]
        (ann,) = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])) if a["instance_id"] == k]
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
        assert ann["area"] == mask.sum()
        x1, y1, x2, y2 = dataset.get(image_id).boxes[k]
        assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
        assert 0 <= ann["score"] <= 1
    # Also usable as detection results against itself (the format COCOeval wants).
    results = coco.loadRes(coco.loadAnns(coco.getAnnIds()))
    assert len(results.getAnnIds()) == len(masks)


def test_export_keeps_integer_image_ids(tmp_path):
    meta = ShardMeta(dataset="coco", split="train", data_root=str(tmp_path), classes=[{"id": 1, "name": "a"}],
                     config_digest="x", teacher="box-prior", round=0)
    mask = np.eye(4, dtype=bool)
    row = {"image_id": "139", "file_name": "139.jpg", "height": 4, "width": 4, "instance_id": 0,
           "category_id": 1, "category": "a", "box": [0.0, 0.0, 4.0, 4.0], "mask_rle": encode_rle(mask),
           "score": 0.5, "round": 0, "teacher": "box-prior", "correspondences": []}
    with ShardWriter(tmp_path / "out", meta) as w:
        w.add("139", rows_to_table([row]))
    export_coco(tmp_path / "out", tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["images"][0]["id"] == 139 and data["annotations"][0]["image_id"] == 139


def test_inspect_summary_counts_and_distributions(shard_dir, capsys):
    out, _, masks, _ = shard_dir
    s = summarize(out)
    assert s["rows"] == len(masks) and s["images"] == 6 and s["images_with_instances"] == 5
    assert s["rejects"] == 1 and s["rejects_by_stage"] == {"load": 1} and not s["problems"]
    per_class = {c["category"]: c["instances"] for c in s["per_class"]}
    assert sum(per_class.values()) == len(masks)
    areas = sorted(int(m.sum()) for m in masks.values())
    assert s["mask_area"]["p0"] == areas[0] and s["mask_area"]["p100"] == areas[-1]
    assert s["mask_area"]["p50"] == pytest.approx(np.median(areas))
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mask_rle: string" in text and "per class:" in text and "img-009.png: unreadable image" in text
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == len(masks)


def test_inspect_reports_a_changed_shard(shard_dir, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(shard_dir[0], out)
    shard = out / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes() + b"\0")
    assert main(["inspect", str(out)]) == 1
    assert "PROBLEM: part-00000.parquet: sha256 differs" in capsys.readouterr().out


def test_inspect_draws_an_image(shard_dir, tmp_path, capsys):
    out, root, masks, dataset = shard_dir
    png = tmp_path / "im001.png"
    assert main(["inspect", str(out), "--image", "im001", "--png", str(png)]) == 0
    drawn = cv2.imread(str(png))[:, :, ::-1].astype(np.int32)
    s = dataset.get("im001")
    original = cv2.imread(str(root / s.file_name))[:, :, ::-1].astype(np.int32)
    assert drawn.shape == (s.height, s.width, 3)
    # Checked against the shard's own masks and boxes, not the drawing code: pixels away from every mask, box
    # and caption are the image's; a pixel of exactly one mask is that mask's palette colour (its outline) or the
    # image blended half-way with it.
    k = len(s.boxes)
    inst = [masks["im001", i] for i in range(k)]
    near = np.zeros(original.shape[:2], bool)
    for b in s.boxes:
        x1, y1, x2, y2 = (int(round(float(v))) for v in b)
        near[max(y1 - 3, 0):y2 + 3, max(x1 - 3, 0):x2 + 3] = True  # box and its stroke
        near[max(y1 - 18, 0):max(y1, 12) + 2, max(x1 - 3, 0):x1 + 110] = True  # the caption above it
    untouched = ~near & ~np.any(inst, 0)
    assert untouched.any()
    np.testing.assert_array_equal(drawn[untouched], original[untouched])
    colours = palette(k).astype(np.int32)
    for i, m in enumerate(inst):
        others = np.any([inst[j] for j in range(k) if j != i], 0) if k > 1 else np.zeros_like(m)
        own = m & ~others & ~near
        c = colours[i]
        outline = np.all(drawn[own] == c, 1)                                 # contour pixels: the colour itself
        blended = np.abs(2 * drawn[own] - original[own] - c).max(1) <= 1     # 0.5 x + 0.5 c, rounded
        assert own.any() and (outline | blended).all()
        assert (drawn[own] != original[own]).any(1).mean() > 0.9
    # --data-root overrides the recorded root; a wrong one is a one-line error naming the file.
    assert main(["inspect", str(out), "--image", "im001", "--png", str(png), "--data-root", str(tmp_path)]) == 2
    assert "img-001.png: file not found" in capsys.readouterr().err
    assert main(["inspect", str(out), "--image", "nope", "--png", str(png)]) == 2
    assert "nope: image id is not in the finished shards" in capsys.readouterr().err


def test_inspect_finds_an_image_by_its_file_name_and_suggests_close_ids(shard_dir, capsys):
    from pipeline.commands.inspect import resolve_image_id

    out, root, masks, dataset = shard_dir
    assert resolve_image_id(out, "im001") == "im001"
    assert resolve_image_id(out, "img-001.png") == "im001"       # the file name the user sees
    assert resolve_image_id(out, "img-001") == "im001"           # its stem
    with pytest.raises(UserError, match=r"im01: image id is not in the finished shards .*close matches: .*im001"):
        resolve_image_id(out, "im01")


def test_inspect_finds_a_coco_image_by_its_zero_padded_file_stem(tmp_path):
    """COCO ids are stored as numbers; users copy the zero-padded file name."""
    from pipeline.commands.inspect import resolve_image_id

    meta = ShardMeta(dataset="coco", split="train", data_root=str(tmp_path), classes=[{"id": 1, "name": "a"}],
                     config_digest="x", teacher="box-prior", round=0)
    row = {"image_id": "90122", "file_name": "images/000000090122.jpg", "height": 4, "width": 4, "instance_id": 1,
           "category_id": 1, "category": "a", "box": [0.0, 0.0, 2.0, 2.0],
           "mask_rle": encode_rle(np.ones((4, 4), bool)), "score": 0.5, "round": 0, "teacher": "box-prior",
           "correspondences": []}
    with ShardWriter(tmp_path / "out", meta) as w:
        w.add("90122", rows_to_table([row]), None)
    for asked in ("90122", "000000090122", "000000090122.jpg", "images/000000090122.jpg"):
        assert resolve_image_id(tmp_path / "out", asked) == "90122"


def test_overlay_blends_only_inside_masks():
    image = np.full((40, 40, 3), 100, np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    out = overlay(image, [mask], np.array([[5, 5, 30, 30]], np.float32), ["x"], alpha=0.5)
    colour = palette(1)[0].astype(np.float32)
    np.testing.assert_array_equal(out[14, 14], np.floor(0.5 * 100 + 0.5 * colour + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(out[35, 35], image[35, 35])     # outside mask and box: untouched
    np.testing.assert_array_equal(out[5, 12], palette(1)[0])       # on the box edge
    with pytest.raises(ValueError, match="differ in number"):
        overlay(image, [mask], np.zeros((2, 4)), ["x"])


def test_overlay_shows_who_won_each_overlap_and_flags_shared_pixels():
    from pipeline.render import OVERLAP_COLOUR

    image = np.full((40, 60, 3), 100, np.uint8)
    a = np.zeros((40, 60), bool)
    a[10:30, 5:35] = True
    b = np.zeros((40, 60), bool)
    b[10:30, 25:55] = True
    boxes = np.array([[2, 2, 38, 38], [22, 2, 58, 38]], np.float32)
    colours = palette(2).astype(np.float32)

    def blend(colour):
        return np.floor(0.5 * 100 + 0.5 * np.asarray(colour, np.float32) + 0.5).astype(np.uint8)

    resolved = overlay(image, [a & ~b, b], boxes, ["a", "b"])          # joint labels: b won the overlap
    np.testing.assert_array_equal(resolved[20, 30], blend(colours[1]))
    np.testing.assert_array_equal(resolved[20, 15], blend(colours[0]))
    shared = overlay(image, [a, b], boxes, ["a", "b"])                  # overlapping labels: flagged
    np.testing.assert_array_equal(shared[20, 30], blend(OVERLAP_COLOUR))
    np.testing.assert_array_equal(shared[20, 15], blend(colours[0]))


def test_inspect_worst_draws_the_lowest_scored_labels_first(shard_dir, tmp_path, capsys):
    import pyarrow.dataset as pads

    from pipeline.commands.inspect import worst_rows
    from pipeline.render import label_tile

    out, root, masks, dataset = shard_dir
    everything = sorted(pads.dataset(str(out), format="parquet").to_table().to_pylist(),
                        key=lambda r: r["score"])
    worst = worst_rows(out, 4)
    assert [(r["image_id"], r["instance_id"]) for r in worst] == \
        [(r["image_id"], r["instance_id"]) for r in everything[:4]]
    png = tmp_path / "worst.png"
    assert main(["inspect", str(out), "--worst", "4", "--png", str(png)]) == 0
    sheet = cv2.imread(str(png))[:, :, ::-1]
    tile = label_tile(np.zeros((50, 50, 3), np.uint8), np.zeros((50, 50), bool), np.array([5, 5, 20, 20]), "x")
    th, tw = tile.shape[:2]
    assert sheet.shape == (th + 8, 4 * (tw + 4) + 4, 3)
    # The first tile is the lowest-scored label: its crop is taken around its own box.
    r = worst[0]
    image = cv2.imread(str(root / dataset.get(r["image_id"]).file_name))[:, :, ::-1]
    first = label_tile(np.ascontiguousarray(image), masks[r["image_id"], r["instance_id"]],
                       np.asarray(r["box"], np.float32), f"{r['score']:.2f} {r['category']} {r['image_id']}")
    np.testing.assert_array_equal(sheet[4:4 + th, 4:4 + tw], first)
    # More than there are rows: all of them; bad requests are one-line errors.
    assert len(worst_rows(out, 10_000)) == len(everything)
    assert main(["inspect", str(out), "--worst", "0", "--png", str(png)]) == 2
    assert "--worst: expected a count >= 1" in capsys.readouterr().err
    assert main(["inspect", str(out), "--worst", "3"]) == 2
    assert "--worst: give --worst K with --png OUT" in capsys.readouterr().err


def test_label_tile_crops_around_the_box_and_letterboxes():
    from pipeline.render import label_tile

    image = np.zeros((100, 200, 3), np.uint8)
    mask = np.zeros((100, 200), bool)
    mask[40:60, 100:180] = True
    tile = label_tile(image, mask, np.array([100, 40, 180, 60], np.float32), "car 0.10", size=120)
    assert tile.shape == (138, 120, 3)
    body = tile[:120]
    # A wide crop (120 x 40 px grown box) is letterboxed: black bars above and below, mask colour in the middle.
    assert body[:20].max() == 0 and body[-20:].max() == 0
    assert body[60, 60].max() > 0
