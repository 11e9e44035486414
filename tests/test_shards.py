"""Shard schema, metadata, atomic writes, manifest, rejects and resume (no Ray)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from pipeline.errors import UserError
from pipeline.shards import (JOURNAL, MANIFEST, REJECTS, ShardMeta, ShardWriter, decode_rle, encode_rle,
                             read_manifest, read_rejects, rle_area, rows_to_table)
from student.pseudo_labels import PseudoLabels


def meta(digest="d1"):
    return ShardMeta(dataset="toy", split="train", data_root="/data/toy", classes=[{"id": 24, "name": "person"}],
                     config_digest=digest, teacher="box-prior", round=0)


def row(image_id, k, mask, corr=()):
    h, w = mask.shape
    return {"image_id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w, "instance_id": k,
            "category_id": 24, "category": "person", "box": [0.0, 0.0, float(w), float(h)],
            "mask_rle": encode_rle(mask), "score": 0.5, "round": 0, "teacher": "box-prior",
            "correspondences": list(corr)}


def image_table(image_id, n=2, shape=(6, 5), seed=0):
    rng = np.random.default_rng(seed)
    return rows_to_table([row(image_id, k, rng.random(shape) > 0.5) for k in range(n)])


def test_rle_round_trip_matches_pycocotools():
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (7, 3), (40, 33)]:
        mask = rng.random(shape) > 0.6
        counts = encode_rle(mask)
        assert isinstance(counts, str)
        np.testing.assert_array_equal(decode_rle(counts, *shape), mask)
        assert rle_area(counts, *shape) == mask.sum()
        # Same bytes pycocotools writes for a Fortran-ordered uint8 mask (the COCO convention).
        ref = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        assert counts == ref
    with pytest.raises(ValueError):
        encode_rle(np.zeros((2, 2, 2), bool))


def test_schema_and_metadata_read_back_with_plain_pyarrow(tmp_path):
    corr = {"partner_image_id": "b", "partner_instance_id": 3, "grid": 7, "src": [0, 5], "dst": [1, 2],
            "weight": [0.25, 1.0]}
    mask = np.zeros((6, 5), bool)
    mask[1:4, 2:5] = True
    with ShardWriter(tmp_path, meta(), shard_rows=100) as w:
        w.add("a", rows_to_table([row("a", 0, mask, [corr])]))
    # From here on only pyarrow and json: the files are the contract.
    table = pq.read_table(tmp_path / "part-00000.parquet")
    s = table.schema
    expected = {
        "image_id": pa.string(), "file_name": pa.string(), "height": pa.int32(), "width": pa.int32(),
        "instance_id": pa.int32(), "category_id": pa.int32(), "category": pa.string(),
        "box": pa.list_(pa.float32(), 4), "mask_rle": pa.string(), "score": pa.float32(), "round": pa.int32(),
        "teacher": pa.string(),
        "correspondences": pa.list_(pa.struct([
            ("partner_image_id", pa.string()), ("partner_instance_id", pa.int32()), ("grid", pa.int32()),
            ("src", pa.list_(pa.int32())), ("dst", pa.list_(pa.int32())), ("weight", pa.list_(pa.float32()))])),
    }
    assert s.names == list(expected)
    for name, tp in expected.items():
        assert s.field(name).type == tp, name
    md = {k.decode(): v.decode() for k, v in s.metadata.items()}
    assert md["boxmask.schema_version"] == "1"
    assert json.loads(md["boxmask.classes"]) == [{"id": 24, "name": "person"}]
    assert md["boxmask.config_digest"] == "d1"
    assert md["boxmask.dataset"] == "toy"
    r = table.to_pylist()[0]
    assert r["correspondences"] == [corr]
    assert r["box"] == [0.0, 0.0, 5.0, 6.0]
    got = mask_utils.decode({"size": [6, 5], "counts": r["mask_rle"].encode()}).astype(bool)
    np.testing.assert_array_equal(got, mask)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (entry,) = manifest["shards"]
    assert entry["rows"] == 1 and entry["image_ids"] == ["a"]
    assert entry["sha256"] == hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest()


def test_shards_split_at_shard_rows_and_empty_images_are_recorded(tmp_path):
    with ShardWriter(tmp_path, meta(), shard_rows=3) as w:
        w.add("a", image_table("a", 2))
        assert not (tmp_path / "part-00000.parquet").exists()      # buffered below shard_rows
        w.add("e", rows_to_table([]), {"image_id": "e", "file_name": "e.png", "height": 6, "width": 5})
        w.add("b", image_table("b", 2))                              # 4 rows >= 3: one shard
        assert (tmp_path / "part-00000.parquet").exists()
        w.add("c", image_table("c", 1))
    m = read_manifest(tmp_path)
    assert [(s["file"], s["rows"], s["image_ids"]) for s in m["shards"]] == [
        ("part-00000.parquet", 4, ["a", "e", "b"]), ("part-00001.parquet", 1, ["c"])]
    assert m["shards"][0]["empty_images"] == [{"image_id": "e", "file_name": "e.png", "height": 6, "width": 5}]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        MANIFEST, REJECTS, "part-00000.parquet", "part-00001.parquet"]


def test_resume_skips_finished_drops_unfinished_and_never_duplicates(tmp_path):
    w = ShardWriter(tmp_path, meta(), shard_rows=2)
    w.open()
    w.add("a", image_table("a", 2))                  # written
    w.add("b", image_table("b", 1))                  # buffered only: lost with the "crash"
    w.reject("x", "x.png", "unreadable image", "load")
    w.close()                                        # no flush: as if the driver died here
    # A shard that was renamed but never reached the manifest, and a torn temporary file.
    (tmp_path / "part-00001.parquet").write_bytes(b"half")
    (tmp_path / ".part-00002.parquet.tmp").write_bytes(b"half")
    with open(tmp_path / REJECTS, "a") as f:
        f.write('{"image_id": "y", "fi')             # torn reject line

    with ShardWriter(tmp_path, meta(), shard_rows=2) as w2:
        assert w2.done == {"a", "x"}
        assert sorted(w2.removed) == [".part-00002.parquet.tmp", "part-00001.parquet"]
        assert w2.add("a", image_table("a", 2)) is False      # finished: never written twice
        assert not w2.has("b")
        assert w2.add("b", image_table("b", 1)) is True
        assert w2.has("b") and w2.has("a") and "b" not in w2.done     # buffered, not yet finished
        assert w2.add("b", image_table("b", 1)) is False      # a retried batch's duplicate
        w2.reject("x", "x.png", "unreadable image", "load")   # same record: not appended again
    ids = [i for s in read_manifest(tmp_path)["shards"] for i in s["image_ids"]]
    assert ids == ["a", "b"]
    rows = [r for p in sorted(tmp_path.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert [(r["image_id"], r["instance_id"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0)]
    assert read_rejects(tmp_path) == [{"image_id": "x", "file": "x.png", "reason": "unreadable image",
                                       "stage": "load"}]
    assert (tmp_path / REJECTS).read_bytes().endswith(b"\n")


@pytest.mark.parametrize("stage", ["before_manifest", "after_manifest"])
def test_ctrl_c_during_a_shard_commit_never_lists_an_image_twice(tmp_path, monkeypatch, stage):
    import os
    import signal

    import pipeline.shards as shards

    real = shards.ShardWriter._journal

    def interrupted(self, entry):
        # The first shard's commit: Ctrl-C arrives right before or right after its manifest line.
        if stage == "before_manifest":
            os.kill(os.getpid(), signal.SIGINT)
        real(self, entry)
        if stage == "after_manifest":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(shards.ShardWriter, "_journal", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path, meta(), shard_rows=4) as w:
            for i in range(3):
                w.add(f"img{i}", image_table(f"img{i}", n=2, seed=i))
    monkeypatch.setattr(shards.ShardWriter, "_journal", real)
    listed = [i for e in read_manifest(tmp_path)["shards"] for i in e["image_ids"]]
    assert sorted(listed) == ["img0", "img1"]  # the shard img1 completed, once; img2 was never added
    with ShardWriter(tmp_path, meta(), shard_rows=4) as w:
        assert w.done == {"img0", "img1"}


def test_config_mismatch_is_an_error_unless_overwrite(tmp_path):
    with ShardWriter(tmp_path, meta("d1"), shard_rows=1) as w:
        w.add("a", image_table("a"))
    with pytest.raises(UserError, match="another config.*--overwrite"):
        ShardWriter(tmp_path, meta("d2")).open()
    with ShardWriter(tmp_path, meta("d2"), shard_rows=1, overwrite=True) as w:
        assert w.done == set()
        w.add("b", image_table("b"))
    m = read_manifest(tmp_path)
    assert m["meta"]["config_digest"] == "d2"
    assert [s["image_ids"] for s in m["shards"]] == [["b"]]
    assert ShardMeta.from_schema(pq.read_schema(tmp_path / "part-00000.parquet")) == meta("d2")


def test_changed_or_missing_shard_is_an_error(tmp_path):
    with ShardWriter(tmp_path, meta(), shard_rows=1) as w:
        w.add("a", image_table("a"))
    path = tmp_path / "part-00000.parquet"
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(UserError, match="part-00000.parquet: sha256 differs"):
        ShardWriter(tmp_path, meta()).open()
    path.unlink()
    with pytest.raises(UserError, match="part-00000.parquet: listed in the manifest but missing"):
        ShardWriter(tmp_path, meta()).open()


def test_second_writer_on_the_same_directory_is_refused(tmp_path):
    with ShardWriter(tmp_path, meta()):
        with pytest.raises(UserError, match="another label run"):
            ShardWriter(tmp_path, meta()).open()


def test_malformed_manifest_is_a_one_line_error(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="_manifest.json: malformed manifest"):
        ShardWriter(tmp_path, meta()).open()
    with pytest.raises(UserError, match="no _manifest.json"):
        read_manifest(tmp_path / "nowhere")


def test_retry_rejects_drops_load_and_label_rejects_and_keeps_dataset_ones(tmp_path):
    with ShardWriter(tmp_path, meta()) as w:
        w.add("a", image_table("a"))
        w.reject("b", "b.png", "unreadable image", "load")
        w.reject("c", "c.png", "teacher diverged", "label")
        w.reject(None, "bad.json", "malformed", "dataset")
    with ShardWriter(tmp_path, meta()) as w:
        assert {"a", "b", "c"} <= w.done and w.retried == []
    with ShardWriter(tmp_path, meta(), retry_rejects={"b", "a"}) as w:     # only the images asked for
        assert w.retried == ["b"] and "b" not in w.done and {"a", "c"} <= w.done
    assert [(r["image_id"], r["stage"]) for r in read_rejects(tmp_path)] == [("c", "label"), (None, "dataset")]
    with ShardWriter(tmp_path, meta(), retry_rejects=True) as w:
        assert w.retried == ["c"] and "c" not in w.done and "a" in w.done
        w.reject("c", "c.png", "teacher diverged", "label")                # a new failure is recorded again
        assert "c" in w.done
    assert [(r["image_id"], r["stage"]) for r in read_rejects(tmp_path)] == [(None, "dataset"), ("c", "label")]
    assert not list(tmp_path.glob(".*.tmp"))
    lines = (tmp_path / REJECTS).read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_a_commit_appends_to_the_journal_and_the_end_of_a_run_folds_it_into_the_manifest(tmp_path):
    with ShardWriter(tmp_path, meta(), shard_rows=1) as w:
        for name in "abc":
            w.add(name, image_table(name, 1))
        assert json.loads((tmp_path / MANIFEST).read_text())["shards"] == []        # as open() wrote it
        assert len((tmp_path / JOURNAL).read_text().splitlines()) == 3
        assert [s["image_ids"] for s in read_manifest(tmp_path)["shards"]] == [["a"], ["b"], ["c"]]
        assert len(PseudoLabels.from_dir(tmp_path)) == 3             # the student reads the journal too
    assert not (tmp_path / JOURNAL).exists()
    assert [s["image_ids"] for s in json.loads((tmp_path / MANIFEST).read_text())["shards"]] == [["a"], ["b"], ["c"]]


def test_the_manifest_is_rewritten_about_log2_times_and_always_reads_complete(tmp_path, monkeypatch):
    import pipeline.shards as shards

    monkeypatch.setattr(shards, "FOLD_MIN_ENTRIES", 2)
    real, folds = shards.atomic_write_bytes, []

    def counted(path, data):
        folds.append(len(json.loads(data)["shards"]) if path.name == MANIFEST else None)
        real(path, data)

    monkeypatch.setattr(shards, "atomic_write_bytes", counted)
    names = [f"im{i:03d}" for i in range(100)]
    with ShardWriter(tmp_path, meta(), shard_rows=1) as w:
        for i, name in enumerate(names):
            w.add(name, image_table(name, 1))
            assert [s["image_ids"][0] for s in read_manifest(tmp_path)["shards"]] == names[: i + 1]
    # open(), then each time the journal is as long as the manifest (2, 4, 8, ..., 64 shards), then the end.
    assert folds == [0, 2, 4, 8, 16, 32, 64, 100]


def test_a_commit_cut_short_in_its_journal_line_is_unfinished_and_a_cut_fold_lists_nothing_twice(tmp_path):
    with ShardWriter(tmp_path, meta(), shard_rows=1) as w:
        w.add("a", image_table("a", 1))
        w.add("b", image_table("b", 1))
        journal = (tmp_path / JOURNAL).read_bytes()
    # As a kill leaves it: "a" folded in and still in the journal (a fold cut between its two steps), "b" in
    # the journal only, and the commit of "c" cut in its line (its shard file already renamed).
    lines = journal.splitlines(keepends=True)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["shards"] = manifest["shards"][:1]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "part-00002.parquet").write_bytes((tmp_path / "part-00001.parquet").read_bytes())
    (tmp_path / JOURNAL).write_bytes(lines[0] + lines[1] + b'{"file":"part-00002.parquet","ro')
    assert [s["image_ids"] for s in read_manifest(tmp_path)["shards"]] == [["a"], ["b"]]
    with ShardWriter(tmp_path, meta(), shard_rows=1) as w:
        assert w.done == {"a", "b"} and w.removed == ["part-00002.parquet"]
        assert not (tmp_path / JOURNAL).exists()                 # folded on open
        w.add("c", image_table("c", 1))
    assert [s["image_ids"] for s in read_manifest(tmp_path)["shards"]] == [["a"], ["b"], ["c"]]


def test_a_malformed_journal_line_is_a_one_line_error_naming_the_journal(tmp_path):
    with ShardWriter(tmp_path, meta(), shard_rows=1) as w:
        w.add("a", image_table("a", 1))
    (tmp_path / JOURNAL).write_text('{"file": "part-00000.parquet"}\nnot json\n')
    with pytest.raises(UserError, match=r"_manifest.jsonl: malformed manifest journal line 2"):
        ShardWriter(tmp_path, meta()).open()
    (tmp_path / JOURNAL).write_text('["part-00001.parquet"]\n')
    with pytest.raises(UserError, match=r"_manifest.jsonl: malformed manifest journal line 1 \(expected an"):
        read_manifest(tmp_path)


def test_a_commit_whose_journal_line_fails_is_not_committed_and_the_directory_resumes(tmp_path, monkeypatch):
    import pipeline.shards as shards

    real, calls = shards.os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 3:                  # the second commit's journal line (after the first's fsync, dir)
            raise OSError(28, "No space left on device")
        real(fd)

    with ShardWriter(tmp_path, meta(), shard_rows=1) as w:
        w.add("a", image_table("a", 1))
        monkeypatch.setattr(shards.os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space left"):
            w.add("b", image_table("b", 1))
        monkeypatch.setattr(shards.os, "fsync", real)
        assert [e.image_ids for e in w.entries] == [["a"]] and "b" not in w.done
        assert (tmp_path / JOURNAL).read_bytes().count(b"\n") == 1      # the failed line was cut off
        w.flush()                                                        # the retry commits b once
    assert [s["image_ids"] for s in read_manifest(tmp_path)["shards"]] == [["a"], ["b"]]
