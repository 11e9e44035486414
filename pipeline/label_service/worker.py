"""The label worker: one teacher (with its memory bank), labeling the batches of samples a Ray Data actor
(``streaming.LabelBatches``) gives it. A worker holds no dataset: samples arrive with each batch and their pixels
are read here. It keeps the instance ids of the images its teacher's memory bank holds objects of (the teacher
names partners by position among their image's boxes; the rows need the dataset's instance ids)."""
from __future__ import annotations

import logging
import os
import resource
import time
import traceback
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from ..datasets.base import Sample
from ..errors import InputError, one_line
from ..shards import SCHEMA
from .cluster import resolve_device
from .rows import sample_rows

log = logging.getLogger(__name__)


def load_sample(sample: Sample) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The image (H,W,3) uint8 and depth (H,W) float32 or None of a sample. Raises ``InputError`` when either
    cannot be read or the image does not match the annotation size."""
    image = sample.load_image()
    if image.shape[:2] != (sample.height, sample.width):
        raise InputError(sample.file_name, f"image is {image.shape[1]}x{image.shape[0]}, annotations say "
                                           f"{sample.width}x{sample.height}")
    return image, (sample.load_depth() if sample.has_depth else None)


def label_images(teacher, loaded: list[tuple[Sample, np.ndarray, Optional[np.ndarray]]]) -> list:
    """The teacher's labels of each (sample, image, depth), or the exception that image failed with. A teacher
    with ``label_batch`` labels them in one call (its network batches the images); others image by image."""
    if hasattr(teacher, "label_batch"):
        return teacher.label_batch([im for _, im, _ in loaded], [s.boxes for s, _, _ in loaded],
                                   [s.classes for s, _, _ in loaded], [d for _, _, d in loaded],
                                   [s.image_id for s, _, _ in loaded], return_exceptions=True)
    out = []
    for sample, image, depth in loaded:
        try:
            out.append(teacher.label(image, sample.boxes, sample.classes, depth=depth, image_id=sample.image_id))
        except Exception as exc:  # noqa: BLE001 - one image's failure is that image's reject
            out.append(exc)
    return out


def _bank_image_ids(teacher) -> Optional[set[str]]:
    """Image ids the teacher's memory bank holds objects of (``bank.image_ids()``); None when the teacher has
    no such bank."""
    image_ids = getattr(getattr(teacher, "bank", None), "image_ids", None)
    return {str(i) for i in image_ids()} if callable(image_ids) else None



class LabelWorker:
    """A label worker: one teacher (with its memory bank), Ray metrics, and the instance ids of the images
    its bank holds objects of. Samples arrive with each batch; the worker holds no dataset. Built in a Ray actor
    (``streaming.LabelBatches``), so the factory is called once per (re)start.
    """

    def __init__(self, index: int, category_names: dict[int, str], teacher_factory: Callable[[str], Any],
                 round_: int, teacher_id: str, device: str = "auto", threads: int = 1):
        from ray.util import metrics

        import torch

        torch.set_num_threads(max(1, threads))
        self.index = index
        self.started = time.monotonic()
        self.busy_s = 0.0
        self.cpu_s = 0.0
        self.images = 0
        self.device = resolve_device(device)
        self.category_names = dict(category_names)
        # image id -> instance ids of the boxes given to the teacher, for the images this worker labeled whose
        # objects may still be bank partners (pruned to the bank's images after each batch when it says).
        self.instance_ids: dict[str, np.ndarray] = {}
        self.teacher = teacher_factory(self.device)
        self.round = round_
        self.teacher_id = teacher_id
        tags = {"worker": str(index)}
        self.m_images = metrics.Counter("boxmask_label_images", "images labeled", tag_keys=("worker",))
        self.m_instances = metrics.Counter("boxmask_label_instances", "instances labeled", tag_keys=("worker",))
        self.m_latency = metrics.Histogram("boxmask_label_image_seconds", "labeling time per image (s)",
                                           boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
                                           tag_keys=("worker",))
        self.m_batch = metrics.Gauge("boxmask_label_batch", "batch being labeled", tag_keys=("worker",))
        self.m_bank = metrics.Gauge("boxmask_label_bank_fill", "objects in the memory bank", tag_keys=("worker",))
        for m in (self.m_images, self.m_instances, self.m_latency, self.m_batch, self.m_bank):
            m.set_default_tags(tags)

    def label_batch(self, batch_id: int, samples: list[Sample]) -> list[dict]:
        """Label the samples; one result per image: ``{"image_id", "table"}`` for labeled images (plus
        ``"empty"`` describing an image without instances) or ``{"image_id", "file", "reason", "stage"}``
        for rejects."""
        self.m_batch.set(batch_id)
        t_batch, c_batch = time.monotonic(), time.process_time()
        out = []
        group = max(1, int(getattr(getattr(self.teacher, "config", None), "network_batch", 1)))
        for start in range(0, len(samples), group):
            out.extend(self._label_group(samples[start:start + group]))
        in_bank = _bank_image_ids(self.teacher)
        if in_bank is not None:
            self.instance_ids = {k: v for k, v in self.instance_ids.items() if k in in_bank}
        bank = getattr(self.teacher, "bank", None)
        if bank is not None:
            self.m_bank.set(float(sum(bank.fill().values())))
        self.busy_s += time.monotonic() - t_batch
        self.cpu_s += time.process_time() - c_batch
        return out

    def _label_group(self, samples: list[Sample]) -> list[dict]:
        """Results of a few samples labeled together (one network call); rejects stay per image."""
        results: dict[str, dict] = {}
        loaded = []
        for sample in samples:
            # Before the teacher runs: it may push this image's objects into its bank even if labeling fails.
            self.instance_ids[sample.image_id] = np.asarray(sample.instance_ids, np.int32)
            if len(sample.boxes) == 0:
                results[sample.image_id] = self._labeled(sample, SCHEMA.empty_table())
                continue
            try:
                loaded.append((sample, *load_sample(sample)))
            except InputError as exc:
                results[sample.image_id] = {"image_id": sample.image_id, "file": sample.file_name,
                                            "reason": str(exc), "stage": "load"}
        t0 = time.monotonic()
        labels = label_images(self.teacher, loaded) if loaded else []
        per_image = (time.monotonic() - t0) / max(len(loaded), 1)
        for (sample, _, _), lab in zip(loaded, labels):
            try:
                if isinstance(lab, Exception):
                    raise lab
                table = sample_rows(sample, lab, self.category_names, self.round, self.teacher_id,
                                    self.instance_ids)
            except Exception as exc:  # a failure on one image must not stop the batch
                log.warning("label-worker-%d: %s failed:\n%s", self.index, sample.image_id,
                            "".join(traceback.format_exception(exc)))
                results[sample.image_id] = {"image_id": sample.image_id, "file": sample.file_name,
                                            "reason": one_line(exc), "stage": "label"}
                continue
            self.m_latency.observe(per_image)
            results[sample.image_id] = self._labeled(sample, table)
        return [results[s.image_id] for s in samples if s.image_id in results]

    def _labeled(self, sample: Sample, table: pa.Table) -> dict:
        self.m_images.inc()
        if table.num_rows:
            self.m_instances.inc(table.num_rows)
        self.images += 1
        result = {"image_id": sample.image_id, "table": table}
        if not table.num_rows:
            result["empty"] = {"image_id": sample.image_id, "file_name": sample.file_name,
                               "height": int(sample.height), "width": int(sample.width)}
        return result

    def stats(self) -> dict:
        """Seconds spent labeling (wall and CPU, all threads), seconds alive, images, images whose instance
        ids it keeps, and peak resident memory (MiB) of this worker process."""
        return {"index": self.index, "pid": os.getpid(), "images": self.images, "busy_s": self.busy_s,
                "cpu_s": self.cpu_s, "known_images": len(self.instance_ids),
                "alive_s": time.monotonic() - self.started,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
