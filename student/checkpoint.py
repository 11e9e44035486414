"""Exported student and teacher weights (``student.pt``, ``teacher.pt``): plain tensors and builtins only.

Each file is a dict: ``format`` ("boxmask-student/1"), ``network`` (the name the teacher's network registry knows
it by), ``state_dict``, ``config`` (the student section as plain values), ``classes`` ([{id, name}] in label order),
``iteration``, ``dataset``, ``kind`` ("student" or "teacher", the EMA weights) and ``digest`` (sha256 of the
weights). They load with ``torch.load(weights_only=True)``; a file that needs unpickling of anything else is
refused by ``load_export`` with a one-line error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import torch

from boxmask_common.errors import UserError
from boxmask_common.files import atomic_path, load_weights_only
from teacher.config import ObjectiveConfig

from .config import NETWORK, StudentConfig
from .model import build_model

FORMAT = "boxmask-student/1"


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Short sha256 of the weights (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def export(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], cfg: StudentConfig, classes: list[dict],
           iteration: int, dataset: str, kind: str) -> str:
    """Write an export atomically (temporary name, then rename); returns its digest."""
    state = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    digest = weights_digest(state)
    payload = {"format": FORMAT, "network": NETWORK, "kind": kind, "state_dict": state,
               "config": dataclasses.asdict(cfg), "classes": [{"id": int(c["id"]), "name": str(c["name"])}
                                                             for c in classes],
               "iteration": int(iteration), "dataset": str(dataset), "digest": digest}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return digest


def config_from_dict(data: dict) -> StudentConfig:
    """The StudentConfig stored in an export (nested ``objectives`` included)."""
    fields = {f.name for f in dataclasses.fields(StudentConfig)}
    values = {k: v for k, v in data.items() if k in fields}
    if isinstance(values.get("objectives"), dict):
        values["objectives"] = ObjectiveConfig(**values["objectives"])
    return StudentConfig(**values)


def load_export(path: str | os.PathLike) -> dict[str, Any]:
    """Load ``student.pt`` / ``teacher.pt`` safely and check its fields; ``UserError`` naming the file otherwise."""
    return check_export(load_weights_only(path), path)


def check_export(data: Any, where: str | os.PathLike) -> dict[str, Any]:
    """An export dict's format, fields and weights digest; ``UserError(where, ...)`` when one is wrong."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(where, f"not a student export (expected format {FORMAT!r})")
    for key in ("state_dict", "config", "classes", "iteration", "digest"):
        if key not in data:
            raise UserError(where, f"student export lacks {key!r}")
    if data["digest"] != weights_digest(data["state_dict"]):
        raise UserError(where, "weights do not match the recorded digest (file altered or truncated)")
    return data


def model_from_export(data: dict[str, Any], where: str | os.PathLike):
    """The model (eval mode, CPU) an export dict describes, after `check_export`."""
    check_export(data, where)
    try:
        cfg = config_from_dict(data["config"])
    except TypeError as exc:
        raise UserError(where, f"unreadable student config ({exc})") from None
    if cfg.norm == "auto":  # the weights file is not needed again, but the normalisation it implied is
        cfg.norm = "frozen_bn" if cfg.weights else "bn"
    cfg.weights = ""
    model = build_model(cfg, len(data["classes"]))
    _load_exact(model, data["state_dict"], where, "the recorded config")
    return model.eval()


def _load_exact(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], where: str | os.PathLike,
                target: str) -> None:
    """Every key and shape of ``state_dict`` into ``model``; ``UserError`` naming the first mismatch."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise UserError(where, f"weights do not fit {target} ({first[:200]})") from None
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise UserError(where, f"weights do not fit {target} (first mismatched key {key!r})")


def warm_start(model: torch.nn.Module, path: str | os.PathLike, classes: list[dict]) -> None:
    """Start ``model`` from an export's weights (a round starting from the previous round's teacher): the export
    must hold the same classes, in the same order, and fit the model exactly."""
    data = load_export(path)
    have = [int(c["id"]) for c in data["classes"]]
    want = [int(c["id"]) for c in classes]
    if have != want:
        raise UserError(path, f"classes {have} differ from the training classes {want}")
    _load_exact(model, data["state_dict"], path, "this run's student config")


def load_model(path: str | os.PathLike):
    """(model in eval mode, export dict) from an export file (checked once, by `model_from_export`)."""
    data = load_weights_only(path)
    return model_from_export(data, path), data
