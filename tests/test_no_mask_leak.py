"""Ground-truth masks never reach labeling or training code (issue 2, item 6).

Two proofs: (1) at run time, nothing public on a ``Dataset`` or ``Sample`` (attributes, dataclass fields,
the values returned by public methods, the arguments bound into the private loaders) holds a mask-like
array; (2) statically, no module that labeling or training runs (kernels, teacher, student, the label
service, shard I/O, the dataset loaders) imports ``pipeline.evaluation``, directly or through another of
our modules, and nothing outside the evaluation module and the loaders touches the ``_gt_*`` hooks.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from coco_helpers import two_image_coco
from pipeline.datasets.base import Dataset, Sample
from pipeline.datasets.cityscapes import CityscapesDataset
from pipeline.datasets.coco import CocoDataset
from pipeline.datasets.toy import generate_toy

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "teacher", "student", "pipeline")
# What labeling and training run: whole packages, and the pipeline modules of the label path.
LABELING_ROOTS = ("kernels", "teacher", "student", "pipeline.label_service", "pipeline.shards",
                  "pipeline.datasets", "pipeline.commands.label")
EVALUATION = "pipeline.evaluation"
GT_HOOKS = {"_gt_masks", "_gt_ignore_masks"}
# Public dataset methods that take arguments, with how to call them.
CALLS_WITH_ARGS = {"get": lambda ds: [ds.get(i) for i in ds.image_ids()],
                   "category_name": lambda ds: [ds.category_name(c.id) for c in ds.categories]}


# ------------------------------------------------------------------------------------------ run time

def mask_like(value: Any, height: int, width: int, path: str = "") -> Iterator[str]:
    """Paths inside ``value`` of bool / uint8 arrays spanning an (H, W) image plane (any (..., H, W) or
    (H, W, ...) layout), except an (H, W, 3) uint8 RGB image."""
    if isinstance(value, np.ndarray):
        plane = (value.ndim >= 2 and (value.shape[-2:] == (height, width) or value.shape[:2] == (height, width)))
        is_image = value.shape == (height, width, 3) and value.dtype == np.uint8
        if plane and value.dtype in (np.bool_, np.uint8) and not is_image:
            yield f"{path}: {value.dtype} {value.shape}"
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from mask_like(v, height, width, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple, set, frozenset)):
        for k, v in enumerate(value):
            yield from mask_like(v, height, width, f"{path}[{k}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from mask_like(getattr(value, f.name), height, width, f"{path}.{f.name}")


def bound_values(fn: Any) -> list[Any]:
    """What a loader callable carries with it: partial arguments and closure cells."""
    out: list[Any] = []
    while isinstance(fn, functools.partial):
        out += list(fn.args) + list(fn.keywords.values())
        fn = fn.func
    for cell in getattr(fn, "__closure__", None) or ():
        out.append(cell.cell_contents)
    return out


def leaks(dataset: Dataset) -> list[str]:
    found = []
    for sample in dataset:
        h, w = sample.height, sample.width
        for f in dataclasses.fields(sample):
            value = getattr(sample, f.name)
            if f.name.startswith("_"):
                value = bound_values(value) if callable(value) else value
            found += mask_like(value, h, w, f"sample {sample.image_id}.{f.name}")
        for name, member in inspect.getmembers(sample, callable):
            if not name.startswith("_"):
                found += mask_like(member(), h, w, f"sample {sample.image_id}.{name}()")
        for name in dir(dataset):
            if name.startswith("_"):
                continue
            member = getattr(dataset, name)
            if callable(member):
                required = [p for p in inspect.signature(member).parameters.values()
                            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
                if required:
                    assert name in CALLS_WITH_ARGS, f"new public Dataset method {name}: add it to this test"
                    member = CALLS_WITH_ARGS[name](dataset)
                else:
                    member = member()
            found += mask_like(member, h, w, f"dataset.{name}")
    return found


def test_coco_dataset_exposes_no_masks(tmp_path):
    ds = CocoDataset(tmp_path, two_image_coco(tmp_path))
    assert len(ds) == 2
    assert leaks(ds) == []


def test_toy_dataset_exposes_no_masks(tmp_path):
    root = generate_toy(tmp_path / "toy", train=1, val=0, seed=3, size=(64, 128))
    ds = CityscapesDataset(root, "train")
    assert len(ds) == 1 and len(ds[0].boxes) > 0
    assert leaks(ds) == []


def test_sample_carries_no_mask_field():
    names = {f.name for f in dataclasses.fields(Sample)}
    assert not {n for n in names if "mask" in n or "seg" in n or "poly" in n}


def test_leak_detector_finds_a_planted_mask(tmp_path):
    ds = CocoDataset(tmp_path, two_image_coco(tmp_path))
    sample = ds.get("1")
    mask = np.zeros((sample.height, sample.width), bool)
    sample.ignore_boxes = {"oops": [mask]}                                  # nested in a public field
    sample._image_loader = functools.partial(np.copy, np.zeros((3, 40, 60), np.uint8))   # bound in a loader
    found = leaks(ds)
    assert any("ignore_boxes['oops'][0]" in f for f in found)
    assert any("_image_loader" in f for f in found)


# ------------------------------------------------------------------------------------------- static

def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES if (root / pkg).is_dir()
            for p in sorted((root / pkg).rglob("*.py"))}


def imported_names(path: Path, module: str) -> set[str]:
    """Absolute names of everything ``path`` imports (``from a import b`` gives ``a`` and ``a.b``), plus
    string arguments of ``importlib.import_module`` / ``__import__`` calls."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            names.add(base_name)
            names.update(f"{base_name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            fn = node.func
            fn_name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if fn_name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
    return names


def reachable(roots: list[str], modules: dict[str, Path]) -> dict[str, str]:
    """Our modules imported, directly or not, by ``roots``: {module: the module that imported it}."""
    def ours(name: str) -> list[str]:
        # Importing a.b.c runs a, a.b and a.b.c.
        parts = name.split(".")
        return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules]

    seen = {r: "<root>" for r in roots}
    todo = list(roots)
    while todo:
        current = todo.pop()
        for name in imported_names(modules[current], current):
            for m in ours(name):
                if m not in seen:
                    seen[m] = current
                    todo.append(m)
    return seen


def labeling_modules(modules: dict[str, Path]) -> list[str]:
    return [m for m in modules if any(m == r or m.startswith(r + ".") for r in LABELING_ROOTS)]


def chain(seen: dict[str, str], module: str) -> str:
    out = [module]
    while seen[out[-1]] != "<root>":
        out.append(seen[out[-1]])
    return " <- ".join(out)


def test_labeling_and_training_never_import_evaluation():
    modules = source_modules(REPO)
    roots = labeling_modules(modules)
    assert {"teacher", "kernels", "pipeline.datasets.coco", "pipeline.datasets.base"} <= set(roots)
    seen = reachable(roots, modules)
    assert EVALUATION not in seen, f"GT masks reachable from labeling code: {chain(seen, EVALUATION)}"


def test_only_evaluation_and_loaders_touch_the_gt_hooks():
    allowed = {EVALUATION}
    offenders = []
    for module, path in source_modules(REPO).items():
        if module in allowed or module.startswith("pipeline.datasets"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in GT_HOOKS:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} uses .{node.attr}")
    assert offenders == []


def test_import_scan_catches_direct_relative_and_indirect_imports(tmp_path):
    files = {
        "pipeline/__init__.py": "",
        "pipeline/evaluation.py": "",
        "pipeline/helpers.py": "from . import evaluation\n",
        "pipeline/label_service.py": "from .helpers import x\n",
        "teacher/__init__.py": "",
        "teacher/a.py": "import importlib\nm = importlib.import_module('pipeline.evaluation')\n",
        "teacher/b.py": "import numpy\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = source_modules(tmp_path)
    seen = reachable(["pipeline.label_service"], modules)
    assert chain(seen, EVALUATION) == "pipeline.evaluation <- pipeline.helpers <- pipeline.label_service"
    assert EVALUATION in reachable(["teacher.a"], modules)
    assert EVALUATION not in reachable(["teacher.b"], modules)


@pytest.mark.parametrize("module", ["pipeline.evaluation"])
def test_evaluation_module_exists(module):
    # The scan above is vacuous if the module it guards against were renamed.
    assert module in source_modules(REPO)
