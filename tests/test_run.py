"""``pipeline run`` (issue 11): the run folder's config check, the round schedule, pseudo-label scoring of a shard
directory against ground truth, the report, and end to end on Ray: an interrupted run (inside labeling, between
stages, inside training) resumed to the same content as an uninterrupted one, the Cityscapes layout through
--data-root, and COCO on coco_tiny.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from interrupts import interrupt_when
from scipy.stats import spearmanr

from pipeline.cli import main
from pipeline.config import RunConfig, load_config
from pipeline.datasets.base import box_to_mask
from pipeline.datasets.cityscapes import CityscapesDataset
from pipeline.datasets.coco import is_held_out
from pipeline.datasets.toy import generate_toy
from pipeline.errors import UserError
from pipeline.evaluation import evaluate_shards, gt_masks, paired_mask_iou
from pipeline.report import per_class_rows, round_rows, write_report
from pipeline.rounds import RunFolder, config_differences, json_safe, round_student_config
from pipeline.shards import ShardMeta, ShardWriter, decode_rle, encode_rle, read_manifest, rows_to_table
from student.config import StudentConfig
from student.train import latest_checkpoint

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
COCO_TINY = REPO.parent / "shared" / "devdata" / "coco_tiny"

# A run small enough for the suite: 6 toy images of 96 x 192, a narrow student, 6 steps per round.
TINY = ["dataset.toy.size=96x192", "dataset.toy.train=6", "dataset.toy.val=2", "teacher.crf.iters=2",
        "teacher.refine.steps=2", "label.batch_images=1", "label.shard_rows=1", "student.backbone=small",
        "student.fpn_channels=32", "student.box_head_dim=64", "student.rpn_proposals=100",
        "student.rois_per_image=32", "student.mask_rois_per_image=8", "student.mask_size=16",
        "student.min_size=[96]", "student.max_size=256", "student.test_size=96", "student.crop=[]",
        "student.batch_size=2", "student.iterations=6", "student.checkpoint_every=2", "student.warmup_iters=2",
        "student.steps=[5]", "student.ema_ramp=2", "student.objectives.warmup_iters=0", "student.log_every=1",
        "run.finetune_iterations=4", "evaluation.gallery=4"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


# ------------------------------------------------------------------------------------------------- pure parts

def test_config_differences_name_result_keys_and_ignore_execution_keys():
    a = load_config(REPO / "configs" / "toy.yaml")
    b = load_config(REPO / "configs" / "toy.yaml", ["student.lr=0.02", "teacher.crf.iters=3", "label.workers=1",
                                                    "student.workers=1", "run.rounds=5", "run.address=x:1"])
    diff = config_differences(dataclasses.asdict(a), dataclasses.asdict(b))
    assert diff == ["student.lr (0.01 -> 0.02)", "teacher.crf.iters (10 -> 3)"]
    assert config_differences(dataclasses.asdict(a), dataclasses.asdict(a)) == []


def test_a_warm_started_round_shrinks_its_schedule_in_proportion():
    cfg = StudentConfig(iterations=300, warmup_iters=50, steps=[240], ema_ramp=50)
    cfg.objectives.warmup_iters = 100
    short = round_student_config(cfg, warm=True, finetune_iterations=150)
    assert (short.iterations, short.warmup_iters, short.steps, short.ema_ramp, short.objectives.warmup_iters) == \
        (150, 25, [120], 25, 50)
    assert cfg.iterations == 300 and cfg.objectives.warmup_iters == 100      # the run's config is untouched
    assert round_student_config(cfg, warm=False, finetune_iterations=150) is cfg
    assert round_student_config(cfg, warm=True, finetune_iterations=0) is cfg


def test_json_safe_turns_non_finite_floats_into_null():
    assert json.loads(json.dumps(json_safe({"a": [1.0, float("nan")], "b": {"c": float("inf")}}))) == \
        {"a": [1.0, None], "b": {"c": None}}


def test_a_run_folder_refuses_another_config_naming_the_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BOXMASK_CACHE", str(tmp_path / "cache"))
    small = ["dataset.toy.size=64x128", "dataset.toy.train=2", "dataset.toy.val=1"]
    folder = RunFolder(tmp_path / "run")
    folder.check(load_config(REPO / "configs" / "toy.yaml", small), resume=False)
    folder.write_config(load_config(REPO / "configs" / "toy.yaml", small))
    folder.check(load_config(REPO / "configs" / "toy.yaml", [*small, "label.workers=1", "run.rounds=5"]), resume=True)
    before = (tmp_path / "run" / "config.yaml").read_text()
    # Through the CLI: refused in one line before Ray starts, naming each differing key; nothing is changed.
    rc = main(["run", "--dataset", "toy", "--out", str(tmp_path / "run"),
               *sets(*small, "student.lr=0.02", "teacher.crf.iters=3")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "config.yaml: this run was started with another config" in err
    assert "differing keys: student.lr (0.01 -> 0.02), teacher.crf.iters (10 -> 3)." in err
    assert (tmp_path / "run" / "config.yaml").read_text() == before and not ray.is_initialized()
    rc = main(["run", "--dataset", "toy", "--out", str(tmp_path / "none"), "--resume", *sets(*small)])
    assert rc == 2 and "--resume: no run here" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    rc = main(["run", "--dataset", "toy", "--out", str(tmp_path / "other"), *sets(*small)])
    assert rc == 2 and "is not a run folder" in capsys.readouterr().err
    assert (tmp_path / "other" / "precious.txt").read_text() == "x"


def test_a_missing_evaluation_split_fails_before_ray_starts(tmp_path, capsys):
    root = generate_toy(tmp_path / "cs", train=2, val=0, seed=1, size=(64, 128))
    rc = main(["run", "--dataset", "cityscapes", "--data-root", str(root), "--config",
               str(REPO / "configs" / "toy.yaml"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "leftImg8bit/val: no such folder" in err
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, message", [
    ("student.norm=batch", "student.norm: unknown norm 'batch'"),
    ("student.batch_size=3", "student.batch_size: 3 images per step do not split over 2 workers"),
])
def test_a_bad_student_setting_fails_before_ray_starts(tmp_path, capsys, setting, message):
    rc = main(["run", "--dataset", "toy", "--out", str(tmp_path / "run"), "--workers", "2",
               *sets(*TINY, setting)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert message in err
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_run_help_documents_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--rounds", "--out", "--workers", "--label-workers", "--address", "--resume", "--set", "--config",
                 "--data-root", "--ann"):
        assert flag in text
    assert "continues from the last finished stage" in text


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory):
    root = generate_toy(tmp_path_factory.mktemp("toy"), train=3, val=0, seed=3, size=(96, 192))
    return CityscapesDataset(root, "train")


def write_shards(out: Path, dataset, masks_of) -> dict:
    """Shards with ``masks_of(sample) -> {instance_id: mask}`` (None: the image is in no shard; an instance not in
    the dict has no row) and a score per row; returns the scores."""
    meta = ShardMeta(dataset="toy", split="train", data_root=str(dataset.root),
                     classes=[{"id": c.id, "name": c.name} for c in dataset.categories], config_digest="t",
                     teacher="test", round=0)
    scores = {}
    rng = np.random.default_rng(0)
    with ShardWriter(out, meta, shard_rows=3) as writer:
        for s in dataset:
            rows, masks = [], masks_of(s)
            if masks is None:
                continue
            for iid, box, cls in zip(s.instance_ids, s.boxes, s.classes):
                if int(iid) not in masks:
                    continue
                score = float(rng.random())
                scores[(s.image_id, int(iid))] = score
                rows.append({"image_id": s.image_id, "file_name": s.file_name, "height": s.height,
                             "width": s.width, "instance_id": int(iid), "category_id": int(cls),
                             "category": dataset.category_name(int(cls)), "box": [float(v) for v in box],
                             "mask_rle": encode_rle(masks[int(iid)]), "score": score, "round": 0,
                             "teacher": "test", "correspondences": []})
            writer.add(s.image_id, rows_to_table(rows))
    return scores


def test_shard_quality_matches_a_brute_force_iou_and_spearman(toy_dataset, tmp_path):
    def boxes(s):
        return {int(i): box_to_mask(b, s.height, s.width) for i, b in zip(s.instance_ids, s.boxes)}

    scores = write_shards(tmp_path / "boxes", toy_dataset, boxes)
    quality = evaluate_shards(toy_dataset, tmp_path / "boxes")
    # Shards holding the filled boxes score exactly the box-as-mask baseline...
    assert quality.labels.overall == quality.box_as_mask.overall
    assert quality.labels.per_class == quality.box_as_mask.per_class
    # ... which is the brute-force mean of per-instance IoUs, and the Spearman is that of the written scores.
    ious, paired = [], []
    for s in toy_dataset:
        gt = gt_masks(toy_dataset, s)
        for iid, box in zip(s.instance_ids, s.boxes):
            iou = float(paired_mask_iou(box_to_mask(box, s.height, s.width)[None], gt[int(iid)][None])[0])
            ious.append(iou)
            paired.append(scores[(s.image_id, int(iid))])
    assert quality.labels.overall.count == len(ious)
    assert quality.labels.overall.mean_iou == pytest.approx(np.mean(ious))
    assert quality.score_spearman == pytest.approx(spearmanr(paired, ious).statistic)
    # Ground-truth masks in the shards score 1; a missing row scores 0 and is counted.
    write_shards(tmp_path / "gt", toy_dataset, lambda s: gt_masks(toy_dataset, s))
    assert evaluate_shards(toy_dataset, tmp_path / "gt").labels.overall.mean_iou == pytest.approx(1.0)
    first = next(iter(toy_dataset))
    write_shards(tmp_path / "some", toy_dataset,
                 lambda s: gt_masks(toy_dataset, s) if s.image_id != first.image_id else boxes(s))
    some = evaluate_shards(toy_dataset, tmp_path / "some")
    assert some.labels.missing == 0 and some.labels.overall.mean_iou < 1.0


def flat(d: dict, prefix: str = "") -> dict:
    """A nested dict of figures as {dotted key: value}."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_shard_quality_streams_the_figures_of_every_instance_kept_in_memory(toy_dataset, tmp_path, monkeypatch):
    """Running sums over one shard at a time give the figures of the per-instance evaluator that keeps every
    record, the bounded galleries its sorted extremes, and the Spearman its rank correlation (exact up to
    SPEARMAN_SAMPLE pairs, a sample beyond). Images in no shard, and instances without a row, score 0."""
    import pipeline.evaluation as evaluation
    from pipeline.evaluation import PseudoLabelEvaluator, box_mask_predictions

    samples = list(toy_dataset)
    rng = np.random.default_rng(5)

    def noisy(s):
        if s.image_id == samples[1].image_id:
            return None                                            # in no shard
        out = {}
        for k, (iid, mask) in enumerate(gt_masks(toy_dataset, s).items()):
            if k % 4 == 3:
                continue                                           # no row
            out[iid] = mask ^ (rng.random(mask.shape) < 0.02 * (k % 5))
        return out

    predictions = {s.image_id: noisy(s) for s in samples}
    scores = write_shards(tmp_path / "noisy", toy_dataset, lambda s: predictions[s.image_id])
    quality = evaluate_shards(toy_dataset, tmp_path / "noisy", min_box_side=8, gallery=3)
    labels, boxes = PseudoLabelEvaluator(toy_dataset, 8), PseudoLabelEvaluator(toy_dataset, 8)
    for s in samples:
        labels.process(s, predictions[s.image_id] or {})
        boxes.process(s, box_mask_predictions(s))
    want, want_boxes = labels.evaluate(), boxes.evaluate()
    assert flat(quality.labels.to_dict()) == pytest.approx(flat(want.to_dict()), nan_ok=True)
    assert flat(quality.box_as_mask.to_dict()) == pytest.approx(flat(want_boxes.to_dict()), nan_ok=True)
    assert not quality.labels.instances
    assert want.missing > 0 and want.excluded > 0 and quality.labels.missing == want.missing
    predicted = sorted((r for r in want.instances if r.predicted), key=lambda r: (r.iou, r.image_id, r.instance_id))
    assert [r for r, _ in quality.worst] == predicted[:3] and [r for r, _ in quality.best] == predicted[::-1][:3]
    assert all(score == pytest.approx(scores[(r.image_id, r.instance_id)], rel=1e-6)    # float32 in the shard
               for r, score in quality.worst + quality.best)
    pairs = [(scores[(r.image_id, r.instance_id)], r.iou) for r in predicted]
    assert quality.spearman_pairs == len(pairs)
    assert quality.score_spearman == pytest.approx(spearmanr(*zip(*pairs)).statistic)
    # Beyond SPEARMAN_SAMPLE pairs, a sample of that many.
    monkeypatch.setattr(evaluation, "SPEARMAN_SAMPLE", 6)
    sampled = evaluate_shards(toy_dataset, tmp_path / "noisy", min_box_side=8)
    assert sampled.spearman_pairs == 6 < len(pairs) and -1.0 <= sampled.score_spearman <= 1.0
    assert flat(sampled.labels.to_dict()) == pytest.approx(flat(quality.labels.to_dict()), nan_ok=True)
    assert not sampled.best
    # The sums-only evaluator takes no other box side than its own.
    with pytest.raises(ValueError, match="min_box_side 0 only"):
        PseudoLabelEvaluator(toy_dataset, keep_instances=False).evaluate(8)


def test_a_reservoir_keeps_every_item_up_to_its_size_and_a_uniform_sample_beyond():
    from pipeline.evaluation import Extremes, Reservoir

    small = Reservoir(10)
    for k in range(7):
        small.add(k)
    assert small.items == list(range(7)) and small.seen == 7
    counts = np.zeros(100)
    for seed in range(400):
        r = Reservoir(10, seed=seed)
        for k in range(100):
            r.add(k)
        assert len(r.items) == 10 and len(set(r.items)) == 10
        counts[r.items] += 1
    assert counts.min() > 15 and counts.max() < 70          # each item kept 40 times in 400 on average
    ex = Extremes(3, key=lambda v: v)
    values = list(np.random.default_rng(0).permutation(5000))
    for v in values:
        ex.add(v)
    assert ex.lowest() == [0, 1, 2] and ex.highest() == [4999, 4998, 4997]


def metrics_of(round_: int, iou: float, ap: float | None) -> dict:
    student = None if ap is None else {
        "split": "val", "mask": {"ap": ap, "ap50": ap + 0.1, "per_class": {"car": ap, "person": float("nan")}},
        "box_as_mask": {"ap": ap / 2}}
    return {"round": round_, "teacher": "box-prior" if round_ == 0 else "abcdef0123456789",
            "pseudo_labels": {"labels": {"overall": {"mean_iou": iou, "count": 5},
                                         "per_class": {"car": {"mean_iou": iou, "count": 3},
                                                       "person": {"mean_iou": iou - 0.1, "count": 2}}},
                              "box_as_mask": {"overall": {"mean_iou": 0.6, "count": 5}}, "score_spearman": 0.5},
            "student": student, "stages": {"label": {"seconds": 3.0, "fusion": None if round_ == 0 else {
                "fit": 0.8123, "network_weight": 0.4, "prior_weight": 0.5, "instances": 9, "images": 3}},
                "evaluate": {"seconds": 1.0},
                                           **({"train": {"seconds": 9.0}} if round_ else {})}}


def test_the_report_tabulates_every_round_and_draws_the_plots(tmp_path):
    metrics = [metrics_of(0, 0.7, None), metrics_of(1, 0.72, 0.3), metrics_of(2, 0.73, 0.35)]
    path = write_report(tmp_path, "Run x", metrics, rounds_planned=3)
    text = path.read_text()
    assert "3 of 4 rounds evaluated" in text
    assert "| 1 | abcdef012345 | 0.812 | 0.400 | 0.7200 | 0.6000 | 0.500 | 30.0 | 40.0 | 15.0 | 9 | 3 | 1 |" in text
    assert "| 0 | box-prior | - | - | 0.7000 | 0.6000 | 0.500 | - | - | - | - | 3 | 1 |" in text
    for name in ("pseudo_label_iou.png", "mask_ap.png"):
        assert f"(plots/{name})" in text
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head, rows = per_class_rows(metrics, "ap")
    assert head == ["class", "round 1", "round 2"] and rows == [["car", "30.0", "35.0"], ["person", "-", "-"]]
    head, rows = per_class_rows(metrics, "iou")
    assert rows[1] == ["person", "0.6000", "0.6200", "0.6300"]
    assert [r[0] for r in round_rows(metrics)[1]] == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------- end to end



@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from pipeline.label_service import init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(RunConfig())
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def run_cmd(out: Path, address: str, rounds: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", "--dataset", "toy", "--rounds", str(rounds), "--out",
            str(out), "--address", address, "--workers", "1", "--label-workers", "2", *sets(*TINY), *extra]


def finished_images(labels: Path) -> int:
    try:
        return sum(len(s["image_ids"]) for s in read_manifest(labels)["shards"])
    except UserError:                        # no manifest yet, or one being replaced
        return 0


def content(run: Path) -> dict:
    """What must not depend on interruptions: the files of the run (checkpoint internals aside), each round's
    rows by (image_id, instance_id) with their masks, and the metrics' keys."""
    files = sorted(os.fspath(p.relative_to(run)) for p in run.rglob("*") if p.is_file()
                   and "checkpoint" not in p.parts and not p.name.startswith("part-") and p.name != "run.log")
    rounds = {}
    for labels in sorted(run.glob("round-*/labels")):
        import pyarrow.dataset as pads

        table = pads.dataset(labels, format="parquet").to_table(
            columns=["image_id", "instance_id", "mask_rle", "height", "width", "round"])
        rounds[labels.parent.name] = {(r["image_id"], r["instance_id"]): r for r in table.to_pylist()}
    keys = {}
    for m in sorted(run.glob("round-*/metrics.json")):
        data = json.loads(m.read_text())
        data["stages"] = {k: sorted(v) for k, v in data["stages"].items()}
        keys[m.parent.name] = sorted(_paths(data))
    return {"files": files, "rows": rounds, "metric_keys": keys}


def _paths(data, prefix=""):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip(".")


def _mask(row) -> np.ndarray:
    return decode_rle(row["mask_rle"], row["height"], row["width"])


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_content_of_an_uninterrupted_one(cluster, tmp_path):
    env = {**os.environ, "BOXMASK_CACHE": str(tmp_path / "cache")}
    straight = subprocess.run(run_cmd(tmp_path / "straight", cluster, 2), env=env, capture_output=True, text=True,
                              timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "round  " in straight.stdout and "report:" in straight.stdout   # the per-round table is printed

    run = tmp_path / "split"
    folder = RunFolder(run)
    # Inside labeling: at least one image of round 0 is in the shards, not all of them. The two label workers can
    # hand in all six images in one burst (30 ms on CI) that the signal does not cut; that run never was inside
    # labeling, so the case starts again from an empty folder.
    for _ in range(3):
        shutil.rmtree(run, ignore_errors=True)
        a = interrupt_when(run_cmd(run, cluster, 1), env, lambda: finished_images(folder.labels(0)) >= 1,
                           what="in labeling")
        assert a.returncode == 130 and "re-run the same command to resume" in a.stderr, a.stderr[-3000:]
        if folder.done(0, "label") is None and finished_images(folder.labels(0)) < 6:
            break
    assert folder.done(0, "label") is None and 1 <= finished_images(folder.labels(0)) < 6
    # Between stages: round 0 finished.
    b = interrupt_when(run_cmd(run, cluster, 1), env, lambda: folder.done(0, "evaluate") is not None,
                       what="between stages")
    assert b.returncode == 130 and "resuming:" in b.stdout
    assert folder.done(1, "train") is None
    # Inside training: round 1 has a checkpoint and no finished training.
    c = interrupt_when(run_cmd(run, cluster, 1), env, lambda: latest_checkpoint(folder.checkpoint(1)) is not None,
                       what="in training")
    assert c.returncode == 130 and folder.done(1, "train") is None
    # Resumed, one round; then a second round added by asking for more.
    d = subprocess.run(run_cmd(run, cluster, 1, "--resume"), env=env, capture_output=True, text=True, timeout=900)
    assert d.returncode == 0, d.stderr[-3000:]
    assert "resuming" in d.stdout and folder.done(1, "train")["resumed"] is True
    e = subprocess.run(run_cmd(run, cluster, 2), env=env, capture_output=True, text=True, timeout=900)
    assert e.returncode == 0, e.stderr[-3000:]
    assert "round 0/2" not in e.stdout and "round 1/2" not in e.stdout and "round 2/2: train" in e.stdout

    want, have = content(tmp_path / "straight"), content(run)
    assert have["files"] == want["files"]
    assert have["metric_keys"] == want["metric_keys"]
    assert set(have["rows"]) == set(want["rows"]) == {"round-0", "round-1", "round-2"}
    for name in want["rows"]:
        assert set(have["rows"][name]) == set(want["rows"][name])            # the same rows, each once
        # Round 0 is the deterministic box-prior teacher; later rounds use weights trained through a resume,
        # equal to a straight run's up to float rounding.
        ious = [float(paired_mask_iou(_mask(want["rows"][name][k])[None], _mask(row)[None])[0])
                for k, row in have["rows"][name].items()]
        assert np.mean(ious) > 0.98, (name, np.mean(ious))
        assert {r["round"] for r in have["rows"][name].values()} == {int(name.split("-")[1])}
    metrics = json.loads((run / "round-2" / "metrics.json").read_text())
    assert metrics["student"]["split"] == "val" and metrics["student"]["held_out"] is True
    assert metrics["stages"]["train"]["warm_start"] is True and metrics["stages"]["train"]["iterations"] == 4
    assert 0.0 < metrics["pseudo_labels"]["labels"]["overall"]["mean_iou"] <= 1.0
    # Each trained round calibrated its fused weights against the labels it learned from, and kept them.
    fusion = metrics["stages"]["label"]["fusion"]
    assert fusion == json.loads((run / "round-2" / "fusion.json").read_text())
    assert 0.0 <= fusion["fit"] <= 1.0 and fusion["images"] == 6 and fusion["instances"] > 0
    assert 0.0 <= fusion["network_weight"] <= 0.5 and fusion["prior_weight"] == 0.5
    assert json.loads((run / "round-0" / "metrics.json").read_text())["stages"]["label"]["fusion"] is None
    report = (run / "report.md").read_text()
    assert "3 of 3 rounds evaluated" in report and "plots/round-2-worst.png" in report


@pytest.mark.slow
def test_the_cityscapes_layout_runs_from_a_data_root(cluster, tmp_path, capsys):
    root = generate_toy(tmp_path / "cs", train=4, val=2, seed=5, size=(96, 192))
    rc = main(["run", "--dataset", "cityscapes", "--data-root", str(root), "--config",
               str(REPO / "configs" / "toy.yaml"), "--rounds", "1", "--out", str(tmp_path / "run"), "--address",
               cluster, "--workers", "1", *sets(*TINY)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    metrics = json.loads((tmp_path / "run" / "round-1" / "metrics.json").read_text())
    assert metrics["student"]["images"] == 2
    assert json.loads((tmp_path / "run" / "round-0" / "labels" / "_manifest.json").read_text())["meta"]["dataset"] \
        == "cityscapes"


@pytest.mark.slow
@pytest.mark.skipif(not (COCO_TINY / "annotations.json").is_file(), reason="../shared/devdata/coco_tiny not here")
def test_coco_cpu_config_runs_a_pretrained_round_on_coco_tiny_with_a_held_out_evaluation(cluster, tmp_path, capsys):
    """configs/coco_cpu.yaml as shipped (ImageNet MobileNetV2 from the hub cache, class-agnostic head, held-out
    images), shrunk to 6 images and a few steps."""
    from student.weights import imagenet_file
    if not imagenet_file("mobilenet_v2").path.is_file():
        pytest.skip("mobilenet_v2 ImageNet weights not in torch's cache (scripts/setup.sh installs them)")
    data = json.loads((COCO_TINY / "annotations.json").read_text())
    held = [im["id"] for im in data["images"] if is_held_out(str(im["id"]), 0.2)][:2]
    kept = [im["id"] for im in data["images"] if not is_held_out(str(im["id"]), 0.2)][:4]
    keep = set(held + kept)
    subset = {**data, "images": [im for im in data["images"] if im["id"] in keep],
              "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
    ann = tmp_path / "six.json"
    ann.write_text(json.dumps(subset))
    rc = main(["run", "--dataset", "coco", "--config", str(REPO / "configs" / "coco_cpu.yaml"), "--data-root",
               str(COCO_TINY), "--ann", str(ann), "--rounds", "1", "--out", str(tmp_path / "run"), "--address",
               cluster, "--workers", "1",
               *sets(*[t for t in TINY if not t.startswith(("dataset.toy", "student.backbone"))],
                     "student.anchor_sizes=[16,32,64,128,256]")])
    assert rc == 0, capsys.readouterr().err[-3000:]
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "backbone: mobilenet_v2" in resolved and "weights: imagenet" in resolved
    metrics = json.loads((tmp_path / "run" / "round-1" / "metrics.json").read_text())
    assert metrics["student"]["held_out"] is True and metrics["student"]["split"] == "holdout"
    assert metrics["student"]["images"] == 2
    assert json.loads((tmp_path / "run" / "round-0" / "label.done").read_text())["images"] == 4
    assert metrics["pseudo_labels"]["labels"]["overall"]["count"] > 0


