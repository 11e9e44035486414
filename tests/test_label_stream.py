"""The label service: a dataset index labeled through Ray Data (``pipeline.label_service.streaming``) on a local
Ray cluster. The labels of the scheduler it replaced (kept as a golden), exactly once across killed, dying and hung
workers (Ray Data redoes their batches; the ledger turns an image lost too often into a reject), --limit, --strict,
retried rejects, the pool's actors and metrics on the dashboard, and the real box-prior teacher through the CLI
killed, interrupted and resumed, from an index and from a configured dataset.

One local cluster is shared by the module (Ray takes 5-20 s to start on 2 cores); the CLI tests point a subprocess
at it with ``--address``.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import labelkit
import numpy as np
import pytest
from interrupts import interrupt_when
from labelkit import all_rows, assert_exactly_once, metric_sum, scrape_metrics

from pipeline.config import LabelConfig
from pipeline.errors import UserError
from pipeline.index import IndexSource
from pipeline.label_service import LabelService
from pipeline.label_service.ledger import AttemptLedger
from pipeline.shards import decode_rle, read_manifest, read_rejects

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
POOL_ACTOR = "MapWorker(MapBatches(LabelBatches))"


def dataset_and_index(tmp_path, **kw):
    root = labelkit.write_folder_dataset(tmp_path / "data", **kw)
    dataset = labelkit.FolderDataset(str(root))
    return dataset, IndexSource(labelkit.write_index(dataset, tmp_path / "index"))


def service(out, source, labeler=None, retry_rejects=False, limit=None, strict=False, **label):
    cfg = LabelConfig(**{"workers": 2, "batch_images": 2, "shard_rows": 4, **label})
    return LabelService(cfg, out, source, labeler or labelkit.BoxLabelerFactory(), teacher_id="box-prior",
                        config_digest="t1", retry_rejects=retry_rejects, limit=limit, strict=strict)


def pool_pids() -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("class_name", "=", POOL_ACTOR), ("state", "=", "ALIVE")])]


def sorted_rows(out) -> list[dict]:
    return sorted(all_rows(out), key=lambda r: (r["image_id"], r["instance_id"]))


def test_the_ledger_counts_losses_splits_a_batch_that_lost_one_and_forgets_finished_images():
    ledger = AttemptLedger()
    assert ledger.register("actor-a") == 0 and ledger.register("actor-b") == 1 and ledger.register("actor-a") == 0
    assert ledger.begin(["a", "b"], 0, 2) == {}
    ledger.end(["a"])                                        # b was running when worker 0 died
    lost = ledger.begin(["a", "b"], 1, 2)
    assert lost == {"b": (1, "its label worker died")} and not ledger.running   # to go one at a time
    assert ledger.begin(["b"], 1, 2) == lost and "b" in ledger.running
    assert ledger.timed_out(1, "no result within label.batch_timeout_s = 2 s") == 1
    assert ledger.begin(["a", "b"], 0, 2) == {"b": (2, "no result within label.batch_timeout_s = 2 s")}
    assert ledger.begin(["a"], 0, 2) == {} and ledger.begin(["b"], 0, 2) == {"b": (2, "no result within "
                                                                              "label.batch_timeout_s = 2 s")}
    assert "b" not in ledger.running                         # given up: never begun again, its count kept
    ledger.end(["a"], 0, {"index": 0, "images": 1})
    assert ledger.begin(["a"], 0, 2) == {}                   # finished: nothing lost
    assert ledger.summary() == {"workers": [{"index": 0, "images": 1}], "timeouts": 1}


@pytest.mark.slow
def test_the_labels_are_those_of_the_scheduler_path_on_workers_that_never_read_the_annotations(cluster, tmp_path):
    """One worker, so its memory bank sees the images in index order, as the one worker of the scheduler that
    labeled the dataset in memory before (removed at 2026-12-05; its rows, rejects and counts on this dataset are
    tests/data/scheduler_labels.json): identical rows, correspondences included, rejects and counts."""
    dataset, source = dataset_and_index(tmp_path, n=13, corrupt=(3,), missing=(5,), sparse_ids=True)
    assert source.fingerprint() == dataset.fingerprint()
    (Path(dataset.root) / "index.json").unlink()             # the annotations: workers read the index rows only
    golden = json.loads((REPO / "tests" / "data" / "scheduler_labels.json").read_text())
    events = []
    summary = service(tmp_path / "out", source, labelkit.BoxLabelerFactory(fail_on=("im007",)),
                      workers=1).run(events.append)
    assert sorted_rows(tmp_path / "out") == golden["rows"]
    root = str(Path(dataset.root))
    assert [{**r, "reason": r["reason"].replace(root, "{root}")} for r in read_rejects(tmp_path / "out")] == \
        golden["rejects"]
    assert {k: getattr(summary, k) for k in golden["counts"]} == golden["counts"]
    assert "3 rejected, 1 rejected by the dataset loader" in summary.line()
    assert sum(e["images"] + e["rejects"] for e in events) == 13
    # The worker keeps the instance ids of the images its bank references (one per class here), not a dataset.
    assert [s["index"] for s in summary.worker_stats] == [0]
    assert 1 <= summary.worker_stats[0]["known_images"] <= 2, summary.worker_stats
    # Correspondences are the documented struct list, partners named by their dataset instance id.
    rows = sorted_rows(tmp_path / "out")
    category = {(r["image_id"], r["instance_id"]): r["category_id"] for r in rows}
    corr = [(r, c) for r in rows for c in r["correspondences"]]
    assert corr and set(corr[0][1]) == {"partner_image_id", "partner_instance_id", "grid", "src", "dst", "weight"}
    for r, c in corr:
        assert category[c["partner_image_id"], c["partner_instance_id"]] == r["category_id"]


@pytest.mark.slow
def test_pool_actors_and_metrics_are_on_the_dashboard_and_a_rerun_writes_nothing(cluster, tmp_path):
    dataset, source = dataset_and_index(tmp_path, n=10, corrupt=(3,))
    seen = set()

    def progress(event):
        seen.update(pool_pids())

    names = {"boxmask_label_images", "boxmask_label_instances", "boxmask_label_image_seconds", "boxmask_label_batch",
             "boxmask_label_bank_fill"}
    before = {k: metric_sum(v) for k, v in scrape_metrics(names, lambda found: True).items()}  # earlier tests'
    summary = service(tmp_path / "out", source, labelkit.BoxLabelerFactory(delay=0.2)).run(progress)
    assert seen                                              # the state API (and dashboard) lists the pool
    assert_exactly_once(tmp_path / "out", dataset, rejected=("im003",))
    assert summary.images_labeled == 9 and summary.rejects == 1 and summary.dataset_rejects == 1
    assert {s["index"] for s in summary.worker_stats} <= {0, 1}
    assert sum(s["images"] for s in summary.worker_stats) == 9
    metrics = scrape_metrics(names, lambda found: all(found.values()) and metric_sum(
        found["boxmask_label_images"]) - before["boxmask_label_images"] >= 9)
    assert metric_sum(metrics["boxmask_label_images"]) - before["boxmask_label_images"] == 9
    assert metric_sum(metrics["boxmask_label_instances"]) - before["boxmask_label_instances"] == summary.instances
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    again = service(tmp_path / "out", source).run()
    assert (again.images_labeled, again.images_skipped, again.shards) == (0, 10, 0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_a_resumed_pipeline_drops_the_finished_images_inside_its_read_tasks(cluster, tmp_path):
    """The finished images are dropped in the read's own tasks: as an operator of its own, zero-CPU, Ray Data
    started a task and the raylet a worker process for every block at once (97 processes, a 2,000-image resume
    took 120 s to its first shard instead of 12). A batch's results come back as one row: a block per image
    stalled the worker about 0.5 s per batch."""
    import pyarrow as pa

    from pipeline.label_service.streaming import BATCH_SCHEMA, decode_results, label_pipeline

    dataset, source = dataset_and_index(tmp_path, n=12)
    ledger = ray.remote(AttemptLedger).options(num_cpus=0).remote()
    args = dict(root=str(Path(dataset.root).resolve()), ledger=ledger, max_attempts=3, batch_timeout_s=60.0,
                category_names={int(c.id): c.name for c in dataset.categories},
                teacher_factory=labelkit.BoxLabelerFactory(), round_=0, teacher_id="box-prior")
    done = ["im001", "im004", "im005", "im010"]
    try:
        ds = label_pipeline(source, pa.array(done), None, args, 1, 2, 1, 1.0, 0.0)
        blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    finally:
        ray.kill(ledger)
    assert [res["image_id"] for b in blocks for _, res in decode_results(b)] == [
        s.image_id for s in dataset if s.image_id not in done]
    assert "ReadParquet->MapBatches(_drop_finished)" in ds.stats()
    # A batch's results are one row (Ray Data cuts blocks between rows only). Batches of 2 within each part of 5
    # images: 0 2 | 3; 6 7 | 8 9; 11.
    assert all(b.schema == BATCH_SCHEMA for b in blocks)
    assert [len(decode_results(b.slice(i, 1))) for b in blocks for i in range(b.num_rows)] == [2, 1, 2, 2, 1]


@pytest.mark.slow
def test_a_killed_worker_loses_no_image_and_duplicates_none(cluster, tmp_path):
    dataset, source = dataset_and_index(tmp_path, n=16)
    killed = []

    def progress(event):
        if not killed:
            killed.append(pool_pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    summary = service(tmp_path / "out", source, labelkit.BoxLabelerFactory(delay=0.1), batch_images=1).run(progress)
    assert_exactly_once(tmp_path / "out", dataset)
    assert summary.images_labeled == 16 and summary.rejects == 0
    assert killed[0] not in pool_pids()


@pytest.mark.slow
def test_an_image_that_kills_its_worker_is_rejected_as_lost_and_its_batch_mates_are_labeled(cluster, tmp_path):
    dataset, source = dataset_and_index(tmp_path, n=8)
    events = []
    summary = service(tmp_path / "out", source, labelkit.BoxLabelerFactory(die_on=("im003",)), batch_images=4,
                      max_attempts=2).run(events.append)
    assert_exactly_once(tmp_path / "out", dataset, rejected=("im003",))
    assert [r for r in read_rejects(tmp_path / "out") if r["stage"] == "label"] == [
        {"image_id": "im003", "file": "img-003.png", "stage": "label",
         "reason": "lost 2 times while labeling it (last time: its label worker died)"}]
    assert (summary.images_labeled, summary.rejects, summary.dataset_rejects) == (7, 1, 1)
    assert sum(e["images"] + e["rejects"] for e in events) == 8


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_hung_worker_is_ended_and_its_batch_redone(cluster, tmp_path, workers):
    """im003 hangs the first worker that labels it for a minute: the watchdog ends that worker after
    label.batch_timeout_s, Ray restarts it and the batch is redone. The run ends long before the minute."""
    dataset, source = dataset_and_index(tmp_path, n=10)
    (tmp_path / "flags").mkdir()
    labeler = labelkit.BoxLabelerFactory(hang_on=("im003",), hang_s=60.0, once_dir=str(tmp_path / "flags"))
    t0 = time.monotonic()
    summary = service(tmp_path / "out", source, labeler, workers=workers, batch_timeout_s=2.0).run()
    assert time.monotonic() - t0 < 45
    assert (tmp_path / "flags" / "im003.hung").exists()
    assert_exactly_once(tmp_path / "out", dataset)
    assert (summary.images_labeled, summary.rejects, summary.batches_timed_out) == (10, 0, 1)


@pytest.mark.slow
def test_an_image_that_always_hangs_is_rejected_after_max_attempts(cluster, tmp_path):
    dataset, source = dataset_and_index(tmp_path, n=6)
    labeler = labelkit.BoxLabelerFactory(hang_on=("im002",), hang_s=60.0)
    summary = service(tmp_path / "out", source, labeler, workers=1, batch_timeout_s=2.0, max_attempts=2).run()
    assert_exactly_once(tmp_path / "out", dataset, rejected=("im002",))
    assert [r["reason"] for r in read_rejects(tmp_path / "out") if r["stage"] == "label"] == [
        "lost 2 times while labeling it (last time: no result within label.batch_timeout_s = 2 s)"]
    assert summary.batches_timed_out == 2


@pytest.mark.slow
def test_limit_strict_and_retried_rejects(cluster, tmp_path):
    import cv2

    dataset, source = dataset_and_index(tmp_path, n=8, corrupt=(5,))
    out = tmp_path / "out"
    first = service(out, source, limit=3).run()
    assert (first.images_total, first.images_labeled) == (3, 3)
    assert {i for s in read_manifest(out)["shards"] for i in s["image_ids"]} == {"im000", "im001", "im002"}
    with pytest.raises(UserError, match=r"img-005.png: .*unreadable image.*--strict"):
        service(out, source, strict=True, workers=1, batch_images=1, max_inflight=1).run()
    done = {i for s in read_manifest(out)["shards"] for i in s["image_ids"]}
    assert {"im000", "im001", "im002", "im003", "im004"} <= done and "im005" not in done
    rest = service(out, source).run()
    assert rest.images_skipped == len(done) + 1 and rest.images_labeled == 8 - len(done) - 1
    cv2.imwrite(str(tmp_path / "data" / "img-005.png"), np.zeros((48, 64, 3), np.uint8))   # the file is fixed
    retried = service(out, source, retry_rejects=True).run()
    assert (retried.images_retried, retried.images_labeled, retried.rejects) == (1, 1, 0)
    assert_exactly_once(out, dataset)


# Enough images that the Ctrl-C, sent once one more image is done than the killed run left, still lands while
# some are left.
N_TOY = 12
TOY = ["--config", str(REPO / "configs" / "toy.yaml"), "--set", "dataset.toy.size=96x192",
       "--set", f"dataset.toy.train={N_TOY}", "--set", "dataset.toy.val=0", "--set", "teacher.crf.iters=2",
       "--set", "teacher.refine.steps=2", "--set", "label.batch_images=1", "--set", "label.shard_rows=1"]


def finished_images(out) -> set[str]:
    if not (out / "_manifest.json").exists():
        return set()
    return {i for s in read_manifest(out)["shards"] for i in s["image_ids"]}


@pytest.mark.slow
def test_the_cli_killed_then_interrupted_then_resumed_labels_the_toy_index_like_the_dataset(cluster, tmp_path):
    out, index = tmp_path / "out", tmp_path / "index"
    env = {**os.environ, "BOXMASK_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "pipeline.cli"]
    made = subprocess.run([*cli, "index", "--dataset", "toy", "--out", str(index), "--part-images", "5", *TOY],
                          env=env, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-3000:]
    label = [*cli, "label", "--index", str(index), "--out", str(out), "--address", cluster, "--workers", "2", *TOY]

    killed = interrupt_when(label, env, lambda: len(finished_images(out)) >= 2, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    done_killed = finished_images(out)
    assert 2 <= len(done_killed) < N_TOY
    ctrl_c = interrupt_when(label, env, lambda: len(finished_images(out)) >= len(done_killed) + 1, signal.SIGINT)
    assert ctrl_c.returncode == 130, ctrl_c.stderr[-3000:]
    assert "interrupted: finished work is kept; re-run the same command to resume" in ctrl_c.stderr
    done_before = finished_images(out)
    assert done_killed < done_before and len(done_before) < N_TOY
    bad = subprocess.run([*label, "--set", "teacher.crf.iters=3"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "holds shards of another config" in bad.stderr
    again = subprocess.run(label, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {len(done_before)} images already finished" in again.stdout
    assert f"labeled {N_TOY - len(done_before)} images" in again.stdout
    listed = collections.Counter(i for s in read_manifest(out)["shards"] for i in s["image_ids"])
    assert len(listed) == N_TOY and set(listed.values()) == {1}

    # --dataset writes the dataset's index into the shard directory and labels it: by one worker, the rows of
    # --index with one.
    for path, flag in ((tmp_path / "by-index", ["--index", str(index)]), (tmp_path / "by-dataset",
                                                                          ["--dataset", "toy"])):
        cmd = [*cli, "label", *flag, "--out", str(path), "--address", cluster, "--workers", "1", *TOY]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    rows = sorted_rows(tmp_path / "by-dataset")
    assert sorted_rows(tmp_path / "by-index") == rows and len(sorted_rows(out)) == len(rows)
    assert (tmp_path / "by-dataset" / "_index" / "_index.json").exists()

    from pipeline.datasets.cityscapes import CityscapesDataset

    manifest = read_manifest(tmp_path / "by-dataset")
    assert manifest["meta"]["dataset"] == "toy" and Path(manifest["meta"]["data_root"]).parent == tmp_path / "cache"
    dataset = CityscapesDataset(manifest["meta"]["data_root"], "train")
    assert {(r["image_id"], r["instance_id"]) for r in rows} == {(s.image_id, int(k)) for s in dataset
                                                                 for k in s.instance_ids}
    assert {r["teacher"] for r in rows} == {"box-prior"} and {r["round"] for r in rows} == {0}
    by_id = {s.image_id: s for s in dataset}
    for r in rows:
        mask = decode_rle(r["mask_rle"], r["height"], r["width"])
        x1, y1, x2, y2 = by_id[r["image_id"]].boxes[r["instance_id"]]
        outside = np.ones_like(mask)
        outside[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = False
        assert not (mask & outside).any()                # teacher masks stay inside their box
        assert 0.0 <= r["score"] <= 1.0


def test_label_help_documents_retry_rejects(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["label", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--retry-rejects" in text and "dataset-level rejects stay" in text
