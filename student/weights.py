"""Pretrained backbone files: torchvision's ImageNet weights, found in (or put into) torch's hub cache.

``student.weights: imagenet`` names the ImageNet weights of ``student.backbone`` through torchvision's own
``Weights`` enums, so the file, its URL and its hash are torchvision's. ``resolve`` returns the cached file,
downloading it with torchvision where the machine can reach the model hub; where it cannot, a ``UserError`` says
in one line which file is missing, where torch looks for it and how to put it there (``pipeline weights install``).

A file is checked before use the way ``torch.hub`` checks a download: the sha256 digest must start with the hash
prefix torchvision writes into the file name. For files whose full digest we know (``FULL_SHA256``) the whole
digest must match.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.hub import HASH_REGEX
from torchvision.models import MobileNet_V2_Weights, ResNet18_Weights, ResNet50_Weights
from torchvision.models._api import WeightsEnum

from boxmask_common.errors import UserError
from boxmask_common.files import atomic_path


# backbone -> torchvision's ImageNet weights for it (V1: the weights torchvision's own detection models start from).
IMAGENET: dict[str, WeightsEnum] = {
    "resnet18": ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": ResNet50_Weights.IMAGENET1K_V1,
    "mobilenet_v2": MobileNet_V2_Weights.IMAGENET1K_V1,
}

# Full sha256 digests we have checked ourselves; others are checked by torchvision's file-name prefix.
FULL_SHA256: dict[str, str] = {
    "mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
}


@dataclass(frozen=True)
class WeightsFile:
    backbone: str
    url: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def path(self) -> Path:
        """Where torch's hub cache keeps it (``$TORCH_HOME/hub/checkpoints``)."""
        return cache_dir() / self.filename


def cache_dir() -> Path:
    """torch.hub's checkpoint folder, the one torchvision downloads into."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_file(backbone: str, where: str = "student.weights") -> WeightsFile:
    """The ImageNet weights file torchvision publishes for ``backbone``; ``UserError`` when it has none."""
    if backbone not in IMAGENET:
        raise UserError(where, f"no ImageNet weights for backbone {backbone!r}; torchvision has them for "
                               f"{', '.join(IMAGENET)}")
    return WeightsFile(backbone, IMAGENET[backbone].url)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file(path: str | os.PathLike, filename: str) -> str:
    """``path``'s sha256 against torchvision's hash for ``filename``; returns the digest, ``UserError`` naming
    the file when it differs."""
    digest = sha256(path)
    full = FULL_SHA256.get(filename)
    match = HASH_REGEX.search(filename)
    prefix = match.group(1) if match else ""
    if full is not None and digest != full:
        raise UserError(path, f"sha256 {digest} is not torchvision's {full} for {filename}; "
                              f"the file is corrupt or another model's")
    if not digest.startswith(prefix):
        raise UserError(path, f"sha256 {digest[:16]}... does not start with {prefix}, torchvision's hash "
                              f"for {filename}; the file is corrupt or another model's")
    return digest


def install(backbone: str, source: Optional[str | os.PathLike] = None,
            download: Optional[Callable[[WeightsFile], None]] = None) -> Path:
    """Put ``backbone``'s ImageNet file into torch's cache, checked; returns its cached path.

    ``source``: copy this local file (checked before it lands, so a wrong file never enters the cache). Without
    it, torchvision downloads the file (``download`` replaces that fetch, for tests)."""
    wf = imagenet_file(backbone, "weights")
    target = wf.path
    target.parent.mkdir(parents=True, exist_ok=True)
    if source is not None:
        source = Path(source)
        if not source.is_file():
            raise UserError(source, "weights file not found")
        check_file(source, wf.filename)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return target
    try:
        (download or _download)(wf)
    except UserError as exc:
        raise UserError(exc.where, f"{exc.problem}; {_offline_hint(wf)}") from None
    try:
        check_file(target, wf.filename)
    except UserError:
        target.unlink(missing_ok=True)
        raise
    return target


def _download(wf: WeightsFile) -> None:
    try:
        torch.hub.download_url_to_file(wf.url, os.fspath(wf.path), progress=True)
    except OSError as exc:  # URLError and socket errors: no route to the hub
        raise UserError(wf.url, f"cannot download ({' '.join(str(exc).split())})") from None


def _offline_hint(wf: WeightsFile) -> str:
    return (f"copy {wf.filename} into {wf.path.parent} with `pipeline weights install {wf.backbone} --from "
            f"/path/to/{wf.filename}`")


def resolve(weights: str, backbone: str, download: Optional[Callable[[WeightsFile], None]] = None) -> str:
    """``student.weights`` -> a file path: ``imagenet`` is torchvision's ImageNet file for ``backbone`` from the
    hub cache (downloaded there when missing and the hub is reachable), anything else a path, returned as is."""
    if weights != "imagenet":
        return weights
    wf = imagenet_file(backbone)
    if not wf.path.is_file():
        try:
            install(backbone, download=download)
        except UserError as exc:
            raise UserError("student.weights", f"imagenet: {wf.filename} is not in torch's cache "
                                               f"{wf.path.parent} and cannot be fetched ({exc.problem})"
                            ) from None
    return os.fspath(wf.path)


def listing() -> list[dict]:
    """One row per backbone with ImageNet weights: backbone, file, cached path, whether it is there."""
    rows = []
    for backbone in IMAGENET:
        wf = imagenet_file(backbone)
        rows.append({"backbone": backbone, "file": wf.filename, "path": os.fspath(wf.path),
                     "cached": wf.path.is_file(), "url": wf.url})
    return rows


__all__ = ["FULL_SHA256", "IMAGENET", "WeightsFile", "cache_dir", "check_file", "imagenet_file", "install",
           "listing", "resolve", "sha256"]
