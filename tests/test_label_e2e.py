"""End to end on tiny toy data: ``pipeline label`` (the real box-prior teacher on a local Ray cluster) ->
the shards read with plain pyarrow against the DESIGN.md section 6 contract -> ``pipeline export-coco`` ->
pycocotools, with the masks bit-exact.

The CLI runs in this process (it starts its own local cluster, shut down at the end); the toy data is 8
images at 128x256 with few CRF / refinement steps, one worker (one memory bank, so cross-image partners
come early), ``teacher.bank.min_partners=2``.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 8

# DESIGN.md section 6, written out here with pyarrow types only: this is the public contract.
CONTRACT = [
    ("image_id", pa.string()),
    ("file_name", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("instance_id", pa.int32()),
    ("category_id", pa.int32()),
    ("category", pa.string()),
    ("box", pa.list_(pa.float32(), 4)),
    ("mask_rle", pa.string()),
    ("score", pa.float32()),
    ("round", pa.int32()),
    ("teacher", pa.string()),
    ("correspondences", pa.list_(pa.struct([
        ("partner_image_id", pa.string()), ("partner_instance_id", pa.int32()), ("grid", pa.int32()),
        ("src", pa.list_(pa.int32())), ("dst", pa.list_(pa.int32())), ("weight", pa.list_(pa.float32()))]))),
]
METADATA_KEYS = {f"boxmask.{k}".encode() for k in (
    "schema_version", "classes", "config_digest", "dataset", "split", "data_root", "teacher", "round")}


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """Run ``pipeline label`` once; returns the shard directory."""
    from pipeline.cli import main

    tmp = tmp_path_factory.mktemp("e2e")
    out = tmp / "labels"
    mp = pytest.MonkeyPatch()
    mp.setenv("BOXMASK_CACHE", str(tmp / "cache"))
    if ray.is_initialized():
        ray.shutdown()
    try:
        rc = main(["label", "--dataset", "toy", "--out", str(out), "--workers", "1",
                   "--config", str(REPO / "configs" / "toy.yaml"),
                   "--set", "dataset.toy.size=128x256", "--set", f"dataset.toy.train={N_IMAGES}",
                   "--set", "dataset.toy.val=0", "--set", "teacher.crf.iters=2", "--set", "teacher.refine.steps=2",
                   "--set", "teacher.bank.min_partners=2", "--set", "label.shard_rows=20"])
    finally:
        ray.shutdown()
        mp.undo()
    assert rc == 0
    return out


def test_shards_meet_the_contract_with_plain_pyarrow(labeled):
    files = sorted(labeled.glob("part-*.parquet"))
    assert len(files) >= 2                              # shard_rows=20: several shards
    for path in files:
        schema = pq.read_schema(path)
        assert [(f.name, f.type) for f in schema] == CONTRACT
        assert schema.field("box").type.list_size == 4
        assert set(schema.metadata) == METADATA_KEYS
        meta = {k.decode().removeprefix("boxmask."): v.decode() for k, v in schema.metadata.items()}
        assert (meta["dataset"], meta["split"], meta["teacher"], meta["round"]) == ("toy", "train", "box-prior", "0")
        assert meta["schema_version"] == "1" and len(meta["config_digest"]) == 16
        classes = json.loads(meta["classes"])
        assert classes and all(set(c) == {"id", "name"} for c in classes)
    # The directory reads as one dataset (pyarrow skips _manifest.json, _rejects.jsonl and dot files).
    table = pads.dataset(str(labeled), format="parquet").to_table()
    rows = table.to_pylist()
    assert table.num_rows == sum(pq.read_metadata(p).num_rows for p in files) > 0
    assert len({r["image_id"] for r in rows}) == N_IMAGES
    keys = collections.Counter((r["image_id"], r["instance_id"]) for r in rows)
    assert set(keys.values()) == {1}
    names = {c["id"]: c["name"] for c in classes}
    for r in rows:
        assert names[r["category_id"]] == r["category"] and 0.0 <= r["score"] <= 1.0
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
    # Cross-image correspondence in box-prior mode: partners are rows of the same class elsewhere.
    with_corr = [r for r in rows if r["correspondences"]]
    assert with_corr, "no row has correspondences"
    by_key = {(r["image_id"], r["instance_id"]): r for r in rows}
    for r in with_corr:
        for c in r["correspondences"]:
            partner = by_key[c["partner_image_id"], c["partner_instance_id"]]
            assert partner["image_id"] != r["image_id"] and partner["category_id"] == r["category_id"]
            assert len(c["src"]) == len(c["dst"]) == len(c["weight"]) > 0
            assert max(c["src"] + c["dst"]) < c["grid"] ** 2 and min(c["src"] + c["dst"]) >= 0


def rows_are_disjoint_per_image(shards: Path) -> int:
    """Asserts that no two rows of one image share a pixel; returns how many images had two or more rows."""
    by_image = collections.defaultdict(list)
    for r in pads.dataset(str(shards), format="parquet").to_table().to_pylist():
        by_image[r["image_id"]].append(mask_utils.decode({"size": [r["height"], r["width"]],
                                                          "counts": r["mask_rle"].encode()}))
    for image_id, masks in by_image.items():
        assert np.stack(masks).astype(np.int32).sum(0).max() <= 1, f"{image_id}: two rows share pixels"
    return sum(len(m) > 1 for m in by_image.values())


def test_rows_of_one_image_are_disjoint(labeled):
    """teacher.occlusion: joint (the toy config's default) resolves each image's overlapping boxes together."""
    assert rows_are_disjoint_per_image(labeled) >= N_IMAGES // 2


def test_export_coco_round_trips_the_masks_bit_exactly(labeled, tmp_path, capsys):
    from pipeline.cli import main

    out_json = tmp_path / "pseudo.json"
    assert main(["export-coco", str(labeled), "--out", str(out_json)]) == 0
    coco = COCO(str(out_json))
    rows = pads.dataset(str(labeled), format="parquet").to_table().to_pylist()
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == N_IMAGES
    image_ids = {img.get("dataset_image_id", str(img["id"])): img["id"] for img in images}
    anns = {(a["image_id"], a["instance_id"]): a for a in coco.loadAnns(coco.getAnnIds())}
    assert len(anns) == len(rows)
    for r in rows:
        ann = anns[image_ids[r["image_id"]], r["instance_id"]]
        shard_mask = mask_utils.decode({"size": [r["height"], r["width"]], "counts": r["mask_rle"].encode()})
        assert np.array_equal(coco.annToMask(ann), shard_mask)
        assert ann["category_id"] == r["category_id"] and ann["area"] == int(shard_mask.sum())
        x1, y1, x2, y2 = r["box"]
        assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])


COCO_TINY = REPO.parent / "shared" / "devdata" / "coco_tiny"


@pytest.mark.skipif(not (COCO_TINY / "annotations.json").is_file(), reason="../shared/devdata/coco_tiny not here")
def test_the_readmes_coco_example_runs_as_written_on_this_machine(tmp_path, capsys):
    """README: ``pipeline label --dataset coco --data-root D --ann A.json --out shards/ --limit 100`` with the coco
    config as shipped (label.workers auto), on coco_tiny with a smaller limit."""
    from pipeline.cli import main

    if ray.is_initialized():
        ray.shutdown()
    try:
        rc = main(["label", "--dataset", "coco", "--data-root", str(COCO_TINY), "--ann",
                   str(COCO_TINY / "annotations.json"), "--out", str(tmp_path / "shards"), "--limit", "6"])
    finally:
        ray.shutdown()
    assert rc == 0, capsys.readouterr().err
    assert "labeled 6 images" in capsys.readouterr().out


@pytest.mark.skipif(not (COCO_TINY / "annotations.json").is_file(), reason="../shared/devdata/coco_tiny not here")
def test_joint_labels_of_real_photographs_are_disjoint(tmp_path, capsys):
    """coco_tiny with teacher.occlusion: joint: the rows of each image share no pixel."""
    from pipeline.cli import main

    if ray.is_initialized():
        ray.shutdown()
    try:
        rc = main(["label", "--dataset", "coco", "--data-root", str(COCO_TINY), "--ann",
                   str(COCO_TINY / "annotations.json"), "--out", str(tmp_path / "shards"), "--limit", "5",
                   "--workers", "1", "--set", "teacher.occlusion=joint"])
    finally:
        ray.shutdown()
    assert rc == 0, capsys.readouterr().err
    assert rows_are_disjoint_per_image(tmp_path / "shards") >= 2
