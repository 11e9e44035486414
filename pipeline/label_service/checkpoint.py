"""Teacher checkpoints: loaded safely on the driver (a bad file is refused before any worker starts), and the
picklable factory a worker builds its teacher with."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from boxmask_common.files import load_weights_only

from ..errors import UserError
from ..shards import sha256_file


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, str]:
    """Load a teacher checkpoint safely (``weights_only=True``) and build the network it names from the registry
    (``teacher.network``), on the CPU, so a bad file is refused before any worker starts.

    Returns (network, teacher id): the export's weights digest where it records one, else the short sha256 of the
    file. Raises ``UserError(path, ...)`` otherwise.
    """
    import student  # noqa: F401  (registers the student's network)
    from teacher.network import UnknownNetwork, build_network, known_networks

    path = Path(path)
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network"), str):
        raise UserError(path, f"checkpoint does not name its network (expected a dict with a 'network' "
                              f"key; known networks: {', '.join(known_networks())})")
    try:
        network = build_network(ckpt, str(path))
    except UnknownNetwork as exc:
        raise UserError(path, f"checkpoint names network {exc.name!r}, which this code does not know "
                              f"(known networks: {', '.join(known_networks())})") from None
    except ValueError as exc:  # the builder's one-line errors name the file already
        raise UserError(path, str(exc).removeprefix(f"{path}: ")) from None
    digest = ckpt.get("digest")
    return network, (str(digest) if isinstance(digest, str) and digest else sha256_file(path)[:12])


def check_network_classes(network: Any, category_ids: list[int], path: str | os.PathLike) -> None:
    """Refuse a network that predicts no mask for some of the dataset's categories (another dataset's teacher)."""
    missing = sorted(set(int(c) for c in category_ids) - set(int(c) for c in network.classes))
    if missing:
        raise UserError(path, f"the network predicts classes {sorted(network.classes)[:10]}"
                              f"{' ...' if len(network.classes) > 10 else ''}; the dataset also has "
                              f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")


@dataclass
class TeacherFactory:
    """Builds the structured teacher in a worker: box-prior mode without a checkpoint, else the checkpoint's
    network (``teacher.network`` registry) wrapped by ``StructuredTeacher``. ``checkpoint`` is made absolute here,
    so a relative path works whatever a worker's working directory is."""

    teacher_cfg: Any                       # teacher.config.TeacherConfig
    checkpoint: Optional[str] = None

    def __post_init__(self):
        if self.checkpoint is not None:
            self.checkpoint = os.path.abspath(self.checkpoint)

    def __call__(self, device: str):
        # Imported here: only worker processes build a teacher, the driver never needs torch models.
        from kernels.extension import load_all
        from teacher import StructuredTeacher

        # Load (on a node where the install did not build them: compile) the kernels while the worker starts, so
        # that no labeling batch pays for a build or has to allow for one in label.batch_timeout_s.
        load_all(device)
        cfg = dataclasses.replace(self.teacher_cfg, device=device)
        if self.checkpoint is None:
            return StructuredTeacher.box_prior(cfg)
        network, _ = load_checkpoint(self.checkpoint)
        return StructuredTeacher(network.to(device).eval(), cfg)
