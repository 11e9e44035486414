"""The student detector (torchvision Mask R-CNN with a box-supervised mask head). Imports ``teacher`` and
``kernels``; never the pipeline. Importing the package registers the student's teacher network
(``maskrcnn-student``) with ``teacher.network``."""

from . import teacher_network  # noqa: F401  (registers the network)
