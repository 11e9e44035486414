"""The student as the structured teacher's network (`teacher.network.TeacherNetwork`), registered as
``maskrcnn-student`` so ``teacher.pt`` exports drive network mode.

The EMA model runs with the ground-truth boxes as its RoIs: the images go through the model's own transform
(normalise, resize to ``test_size``), the boxes are rescaled with them, the backbone runs once per batch of images,
and the mask head runs over every box of the batch at once. No proposals, no box regression: the box is the
annotation's, the mask is the box class's channel of the mask predictor.
"""
from __future__ import annotations

import torch
from torch import nn

from boxmask_common.errors import UserError

from .checkpoint import model_from_export


class StudentTeacherNetwork(nn.Module):
    """Mask probabilities (N,M,M) over each box (M = ``mask_size``) and mask-head features (N,C,g,g) over the box
    grown by ``correspondence_pad``, for lists of images, boxes and dataset category ids (the protocol's shapes).

    ``model``: a student ``GeneralizedRCNN`` (``student.model.build_model``); ``classes``: the dataset category id
    of each of its foreground labels, in label order.
    """

    def __init__(self, model: nn.Module, classes: list[int]):
        super().__init__()
        self.model = model
        self.classes = [int(c) for c in classes]
        self._label = {c: i + 1 for i, c in enumerate(self.classes)}

    def labels(self, classes: torch.Tensor) -> torch.Tensor:
        """Dataset category ids (N,) -> the model's contiguous labels (N,) in 1..K; unknown ids are an error."""
        try:
            return torch.tensor([self._label[int(c)] for c in classes.tolist()], dtype=torch.int64,
                                device=classes.device)
        except KeyError as exc:
            raise ValueError(f"category id {exc.args[0]} is not one of the network's classes {self.classes}") from None

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor], boxes: list[torch.Tensor],
                classes: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        model = self.model
        heads = model.roi_heads
        batch, _ = model.transform(list(images))
        scaled = []
        for im, b, (h, w) in zip(images, boxes, batch.image_sizes):
            ratio = b.new_tensor([w / im.shape[-1], h / im.shape[-2]]).repeat(2)
            scaled.append(b.float() * ratio)
        features = model.backbone(batch.tensors)
        logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, scaled, batch.image_sizes)))
        labels = self.labels(torch.cat(classes)) if classes else logits.new_zeros(0, dtype=torch.int64)
        probs = logits[torch.arange(len(labels), device=logits.device), labels].sigmoid().float()
        feats = heads.instance_features(features, scaled, batch.image_sizes)
        counts = [len(b) for b in boxes]
        return list(zip(probs.split(counts), feats.split(counts)))


def build_from_export(checkpoint: dict, where: str = "checkpoint") -> StudentTeacherNetwork:
    """The registry's builder: a loaded ``teacher.pt`` / ``student.pt`` dict -> the network on the CPU, in eval
    mode. A tampered or malformed export raises ``UserError``."""
    model = model_from_export(checkpoint, where)
    ids = [int(c["id"]) for c in checkpoint["classes"]]
    if len(set(ids)) != len(ids):
        raise UserError(where, f"duplicate class ids in {ids}")
    return StudentTeacherNetwork(model, ids).eval()

