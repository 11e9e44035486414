"""Builds the C++ (and, where a CUDA toolkit and a GPU or TORCH_CUDA_ARCH_LIST say what to build for, CUDA)
extensions at install, as torchvision and detectron2 do; everything else is in pyproject.toml.

The extension list and flags come from kernels/extension.py, the same ones its fallback build uses. torch is a
build requirement: ./scripts/setup.sh installs it first and builds with --no-build-isolation, so the extensions
are built against the torch they run with.
"""
import importlib.util
import sys
from pathlib import Path

from setuptools import setup

_spec = importlib.util.spec_from_file_location("_boxmask_extension", Path(__file__).parent / "kernels" / "extension.py")
_extension = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _extension  # dataclasses look their module up while it runs
_spec.loader.exec_module(_extension)
ext_modules, cmdclass = _extension.setuptools_extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
