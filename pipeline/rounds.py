"""``pipeline run``: the self-training rounds of DESIGN.md section 2 in one run folder, on one Ray cluster.

::

    round 0      label      box-prior teacher over the training split    -> round-0/labels
                 evaluate   pseudo-label IoU against ground truth
    round r>=1   train      student from boxes + round r-1's shards      -> round-r/checkpoint/{student,teacher}.pt
                 label      network-mode teacher (fused), round r's EMA  -> round-r/labels
                 evaluate   pseudo-label IoU; the EMA student's mask AP on the evaluation split

Run folder::

    config.yaml                 the resolved config (a re-run must match it, execution keys aside)
    round-<r>/labels/           Parquet shards (pipeline label's layout)
    round-<r>/checkpoint/       the Ray Train run (train/: its checkpoints), student.pt, teacher.pt
    round-<r>/metrics.json      the round's figures (written by its evaluate stage)
    round-<r>/fusion.json       the fused weights calibrated for the round (rounds >= 1, adaptive fusion)
    round-<r>/<stage>.done      a stage's completion record (json), written atomically once its outputs are whole
    report.md, plots/, logs/run.log

A stage is redone only while its ``.done`` record is missing, and it resumes inside: the label service skips
finished images, training continues from its newest checkpoint. Labeling and training take turns on the cluster:
the label service stops its workers before it returns, and Ray Train releases its workers when ``fit`` returns.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from boxmask_common.files import atomic_write_bytes
from student.config import StudentConfig
from student.schedule import stretch_schedule
from student.train import latest_checkpoint

from .calibration import Calibration, load_or_calibrate
from .config import Config, to_dict
from .datasets import build_dataset
from .errors import UserError, one_line
from .evaluation import evaluate_shards
from .labeling import prepare_label, run_label
from .model_eval import eval_dataset_config, evaluate_checkpoint
from .report import gallery, round_rows, text_table, write_png, write_report
from .training import build_job, check_student, run_training

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
FUSION_FILE = "fusion.json"             # a round's calibrated fused weights (pipeline.calibration)
# Keys that say how a run executes, not what it computes: they may differ between invocations of one run.
# label.max_restarts and label.max_task_retries are gone (Ray Data restarts label workers itself); they stay
# here so that a run folder started before can still be resumed.
EXECUTION_KEYS = frozenset({
    "run.name", "run.root", "run.rounds", "run.address", "run.dashboard_host",
    "label.workers", "label.cpus_per_worker", "label.gpus_per_worker", "label.max_inflight",
    "label.batch_timeout_s", "label.max_restarts", "label.max_task_retries",
    "student.workers", "student.cpus_per_worker", "student.use_gpu", "student.loader_workers",
    "student.max_failures", "student.log_every", "student.checkpoint_every", "student.keep_checkpoints",
    "teacher.device", "teacher.network_batch",
})


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None, so that metrics.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def stages_of(round_: int) -> tuple[str, ...]:
    return ("label", "evaluate") if round_ == 0 else ("train", "label", "evaluate")


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(stored: dict, current: dict) -> list[str]:
    """Dotted keys (execution keys aside) whose values differ, as ``key (old -> new)``, sorted."""
    a, b = flatten(stored), flatten(current)
    keys = sorted(k for k in set(a) | set(b) if k not in EXECUTION_KEYS and a.get(k) != b.get(k))
    return [f"{k} ({a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r})" for k in keys]


def round_student_config(cfg: StudentConfig, warm: bool, finetune_iterations: int) -> StudentConfig:
    """The student config of one round: a warm-started round with ``finetune_iterations`` set trains that many
    steps, with its warm-up, lr steps, EMA ramp and affinity warm-up shrunk in proportion."""
    if not warm or finetune_iterations <= 0 or finetune_iterations == cfg.iterations:
        return cfg
    # A fine-tune is shorter than the first round, so its start-up warm-ups shrink too, unlike a stretched run's.
    f = finetune_iterations / cfg.iterations
    return dataclasses.replace(stretch_schedule(cfg, finetune_iterations), warmup_iters=round(cfg.warmup_iters * f),
                               ema_ramp=round(cfg.ema_ramp * f))


class RunFolder:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()

    def round_dir(self, r: int) -> Path:
        return self.path / f"round-{r}"

    def labels(self, r: int) -> Path:
        return self.round_dir(r) / "labels"

    def checkpoint(self, r: int) -> Path:
        return self.round_dir(r) / "checkpoint"

    def teacher(self, r: int) -> Path:
        return self.checkpoint(r) / "teacher.pt"

    def metrics_path(self, r: int) -> Path:
        return self.round_dir(r) / METRICS_FILE

    def done(self, r: int, stage: str) -> Optional[dict]:
        """The completion record of a stage, or None while it is not finished."""
        try:
            return json.loads((self.round_dir(r) / f"{stage}.done").read_text())
        except FileNotFoundError:
            return None

    def mark_done(self, r: int, stage: str, record: dict) -> None:
        atomic_write_bytes(self.round_dir(r) / f"{stage}.done", json.dumps(record, indent=1).encode())

    def metrics(self) -> list[dict]:
        """The metrics of every evaluated round, in order (stops at the first round without them)."""
        out = []
        r = 0
        while self.done(r, "evaluate") is not None:
            out.append(json.loads(self.metrics_path(r).read_text()))
            r += 1
        return out

    def check(self, cfg: Config, resume: bool) -> None:
        """Refuse, changing nothing, a folder this run must not use: one started with another config (naming the
        differing keys), a missing run with ``resume``, or a non-empty folder that is not a run."""
        config_file = self.path / CONFIG_FILE
        if config_file.exists():
            try:
                stored = yaml.safe_load(config_file.read_text()) or {}
            except yaml.YAMLError as exc:
                raise UserError(config_file, f"unreadable ({one_line(exc)})") from None
            diff = config_differences(stored, to_dict(cfg))
            if diff:
                raise UserError(config_file, f"this run was started with another config; differing keys: "
                                             f"{', '.join(diff)}. Use another --out, or the run's own config")
        elif resume:
            raise UserError(self.path, "--resume: no run here (config.yaml is missing)")
        elif self.path.exists() and any(self.path.iterdir()):
            raise UserError(self.path, "exists and is not a run folder (no config.yaml); choose another --out")

    def write_config(self, cfg: Config) -> None:
        """Create the folder and write ``config.yaml`` (after ``check``). Rewritten by every invocation, so that
        the execution keys (workers, rounds) show the latest one."""
        (self.path / "logs").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


@dataclasses.dataclass
class RoundRunner:
    """Runs the rounds of one run folder on the connected Ray cluster (call ``check_inputs``, then ``run``)."""

    cfg: Config
    folder: RunFolder
    rounds: int

    def run(self) -> list[dict]:
        for r in range(self.rounds + 1):
            for stage in stages_of(r):
                if self.folder.done(r, stage) is not None:
                    continue
                print(f"round {r}/{self.rounds}: {stage}", flush=True)
                t0 = time.monotonic()
                record = getattr(self, f"_{stage}")(r)
                record["seconds"] = round(time.monotonic() - t0, 2)
                record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                if stage == "evaluate":
                    self._write_metrics(r, record)
                self.folder.mark_done(r, stage, record)
                log.info("round %d %s done in %.1f s", r, stage, record["seconds"])
            write_report(self.folder.path, f"Run {self.folder.path.name}: {self.cfg.dataset.name}",
                         self.folder.metrics(), self.rounds)
        metrics = self.folder.metrics()
        print(text_table(*round_rows(metrics)))
        print(f"report: {self.folder.path / 'report.md'}")
        return metrics

    def check_inputs(self) -> None:
        """Both splits load and the student builds (call before ``run``): a missing evaluation split or a bad
        ``student`` setting fails before anything is written or Ray starts, not after round 0's labeling or round
        1's training (``--dataset toy`` generates its data here)."""
        check_student(self.cfg.student)
        for cfg, role in ((self.cfg, "training"), (eval_dataset_config(self.cfg), "evaluation")):
            dataset = build_dataset(copy.deepcopy(cfg.dataset))
            if len(dataset) == 0:
                key = "dataset.split" if role == "training" else "evaluation.split"
                raise UserError(dataset.root, f"the {role} split {cfg.dataset.split!r} has no usable images "
                                              f"(set {key})")

    # -- stages
    def _train(self, r: int) -> dict:
        cfg = copy.deepcopy(self.cfg)
        warm = r >= 2 and cfg.run.warm_start
        cfg.student = round_student_config(cfg.student, warm, cfg.run.finetune_iterations)
        out = self.folder.checkpoint(r)
        resume = latest_checkpoint(out) is not None
        job = build_job(cfg, out, labels=self.folder.labels(r - 1),
                        init_from=self.folder.teacher(r - 1) if warm else None)
        s = cfg.student
        print(f"  {len(job.samples)} images, round {r - 1}'s labels, "
              f"{'warm start from round ' + str(r - 1) if warm else 'fresh start'}, {s.iterations} iterations x "
              f"{s.batch_size} images on {s.workers} workers{', resuming' if resume else ''}", flush=True)
        t0 = time.monotonic()
        run_training(job, resume=resume)
        seconds = time.monotonic() - t0
        return {"iterations": s.iterations, "warm_start": warm, "resumed": resume,
                "images_per_s": round(s.iterations * s.batch_size / seconds, 3) if not resume else None}

    def _label(self, r: int) -> dict:
        cfg = copy.deepcopy(self.cfg)
        calibration = self._calibrate(cfg, r)
        service = prepare_label(cfg, self.folder.labels(r), os.fspath(self.folder.teacher(r)) if r else None, r)
        summary = run_label(service, self.folder.labels(r))
        print(f"  {summary.line()}", flush=True)
        return {"teacher": service.teacher_id, "images": summary.images_labeled, "instances": summary.instances,
                "rejects": summary.rejects, "skipped": summary.images_skipped,
                "images_per_s": round(summary.images_labeled / summary.seconds, 3) if summary.seconds else None,
                "fusion": dataclasses.asdict(calibration) if calibration else None}

    def _calibrate(self, cfg: Config, r: int) -> Optional[Calibration]:
        """Round r's fused weights from its student's fit to round r-1's labels (`pipeline.calibration`), set in
        ``cfg.teacher.fusion``; None where the round is not fused adaptively."""
        fusion = cfg.teacher.fusion
        if not r or cfg.teacher.unary != "fused" or not fusion.adaptive or fusion.network_weight <= 0:
            return None
        result = load_or_calibrate(self.folder.round_dir(r) / FUSION_FILE, cfg.teacher, cfg.dataset,
                                   self.folder.teacher(r), self.folder.labels(r - 1), cfg.evaluation.min_box_side)
        cfg.teacher.fusion = result.fusion(fusion)
        print(f"  fusion: the student reproduces round {r - 1}'s labels with mean IoU {result.fit:.3f}, the filled "
              f"boxes {result.box_fit:.3f} (gain {result.gain:.2f}; {result.instances} instances, {result.images} "
              f"images): network weight {result.network_weight:g}, box prior {result.prior_weight:g}", flush=True)
        return result

    def _evaluate(self, r: int) -> dict:
        cfg = copy.deepcopy(self.cfg)
        dataset = build_dataset(cfg.dataset)
        quality = evaluate_shards(dataset, self.folder.labels(r), cfg.evaluation.min_box_side, cfg.evaluation.gallery)
        for kind in ("best", "worst"):
            sheet = gallery(dataset, self.folder.labels(r), quality, cfg.evaluation.gallery, worst=kind == "worst")
            if sheet is not None:
                write_png(self.folder.path / "plots" / f"round-{r}-{kind}.png", sheet)
        record: dict = {"pseudo_labels": quality.to_dict(), "student": None}
        if r:
            ecfg = eval_dataset_config(cfg)
            ev = evaluate_checkpoint(ecfg, self.folder.teacher(r), cfg.evaluation.limit or None)
            held_out = cfg.dataset.name != "coco" or bool(cfg.evaluation.ann or cfg.dataset.holdout)
            record["student"] = {"checkpoint": "teacher.pt", "split": ecfg.dataset.split, "held_out": held_out,
                                 "images": ev.results["mask"].num_images,
                                 "mask": ev.results["mask"].to_dict(), "box": ev.results["box"].to_dict(),
                                 "box_as_mask": ev.results["box-as-mask"].to_dict()}
        return record

    def _write_metrics(self, r: int, evaluate: dict) -> None:
        stages = {s: self.folder.done(r, s) for s in stages_of(r) if s != "evaluate"}
        stages["evaluate"] = {"seconds": evaluate["seconds"]}
        metrics = {"round": r, "teacher": stages["label"]["teacher"], "pseudo_labels": evaluate.pop("pseudo_labels"),
                   "student": evaluate.pop("student"), "stages": stages}
        atomic_write_bytes(self.folder.metrics_path(r), json.dumps(json_safe(metrics), indent=1).encode())
