"""The student detector (torchvision Mask R-CNN with a box-supervised mask head). Imports ``teacher`` and
``kernels``; never the pipeline."""
