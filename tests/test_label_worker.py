"""The label worker's parts that run without Ray: batching a teacher's calls, isolating a failing image, the rows
of one image, and the instance ids a worker keeps for its teacher's memory bank."""
from __future__ import annotations

import dataclasses

import labelkit
import numpy as np
import pytest

from pipeline.label_service.rows import sample_rows
from pipeline.label_service.worker import _bank_image_ids, label_images


def test_workers_keep_instance_ids_only_of_images_in_the_teachers_bank():
    """``_bank_image_ids`` reads the real memory bank (the worker prunes its image -> instance ids map to it)."""
    import torch

    from teacher import StructuredTeacher
    from teacher.config import TeacherConfig

    teacher = StructuredTeacher.box_prior(TeacherConfig(device="cpu"))
    teacher.bank = type(teacher.bank)(dataclasses.replace(teacher.config.bank, capacity=2))
    assert _bank_image_ids(teacher) == set()
    for k, image_id in enumerate(["a", "b", "c"]):
        teacher.bank.push(24, torch.zeros(4, 7, 7), torch.zeros(56, 56), torch.tensor([0.0, 0.0, 40.0, 40.0]),
                          image_id, k)
    assert _bank_image_ids(teacher) == {"b", "c"}                 # "a" left the FIFO
    assert _bank_image_ids(labelkit.BoxLabeler()) == set()
    assert _bank_image_ids(object()) is None                     # a labeler without a bank: keep everything


def test_label_images_batches_a_teacher_that_can_and_isolates_a_failing_image():
    import types

    from teacher import StructuredTeacher
    from teacher.config import TeacherConfig

    rng = np.random.default_rng(0)
    loaded = []
    for k in range(3):
        image = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
        sample = types.SimpleNamespace(image_id=f"im{k}", file_name=f"im{k}.png", height=40, width=50,
                                       boxes=np.array([[5, 5, 30, 35]], np.float32), classes=np.array([1]),
                                       instance_ids=np.array([7]))
        loaded.append((sample, image, None))
    loaded[1] = (loaded[1][0], loaded[1][1][:, :, :2], None)  # a 2-channel image: the teacher refuses it
    calls = []

    class Counting(StructuredTeacher):
        def label_batch(self, *args, **kwargs):
            calls.append(len(args[0]))
            return super().label_batch(*args, **kwargs)

    out = label_images(Counting(None, TeacherConfig(network_batch=4)), loaded)
    assert calls == [3] and isinstance(out[1], ValueError) and "RGB" in str(out[1])
    table = sample_rows(loaded[2][0], out[2], {1: "thing"}, 0, "box-prior")
    assert table.column("instance_id").to_pylist() == [7] and table.column("category").to_pylist() == ["thing"]
    # A teacher without label_batch (the tests' simple labelers) goes image by image, with the same isolation.
    plain = types.SimpleNamespace(label=lambda image, boxes, classes, depth=None, image_id=None: (
        [types.SimpleNamespace(mask=np.zeros(image.shape[:2], bool), score=0.5)] if image.shape[2] == 3
        else 1 / 0))
    out = label_images(plain, loaded)
    assert isinstance(out[1], ZeroDivisionError) and len(out[0]) == len(out[2]) == 1
    with pytest.raises(RuntimeError, match="teacher returned 2 labels for 1 boxes"):
        sample_rows(loaded[0][0], out[0] * 2, {}, 0, "box-prior")
