"""The student detector (torchvision Mask R-CNN with a box-supervised mask head). Imports ``teacher`` and
``kernels``; never the pipeline. Importing the package registers the student's teacher network
(``maskrcnn-student``) with ``teacher.network``; its builder loads torch and the model code on first use, so a
process that only reads the student's config stays light."""
from __future__ import annotations

from teacher.network import register_network

from .config import NETWORK


def build_teacher_network(checkpoint: dict, where: str = "checkpoint"):
    """The registry's builder for ``NETWORK`` (`student.teacher_network.build_from_export`)."""
    from .teacher_network import build_from_export

    return build_from_export(checkpoint, where)


register_network(NETWORK, build_teacher_network)
