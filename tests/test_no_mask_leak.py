"""Ground-truth masks never reach labeling or training code (issue 2, item 6).

Two proofs: (1) at run time, nothing public on a ``Dataset`` or ``Sample`` (attributes, dataclass fields,
the values returned by public methods, the arguments bound into the private loaders) holds anything
mask-like: an array spanning the image plane (any dtype: bool/uint8 masks, uint16 id maps, float soft
masks), a COCO RLE (a counts string or bytes, a dict with "counts", an uncompressed counts list) or a
polygon (a list of [x, y] points or a flat COCO x, y list); the only image-plane values allowed are the
RGB image ``load_image()`` returns and the float32 depth ``load_depth()`` returns; (2) statically, no
module that labeling or training runs (kernels, teacher, student, the label service, shard I/O, the dataset
loaders) imports ``pipeline.evaluation``, directly or through another of
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
from pycocotools import mask as mask_utils

from pipeline.datasets.base import Dataset, Sample
from pipeline.datasets.cityscapes import CityscapesDataset
from pipeline.datasets.coco import CocoDataset
from pipeline.datasets.toy import generate_toy
from pipeline.errors import InputError

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "teacher", "student", "pipeline")
# What labeling and training run: whole packages, and the pipeline modules of the label path.
LABELING_ROOTS = ("kernels", "teacher", "student", "pipeline.label_service", "pipeline.labeling", "pipeline.training",
                  "pipeline.shards", "pipeline.datasets", "pipeline.commands.label", "pipeline.commands.train")
EVALUATION = "pipeline.evaluation"
GT_HOOKS = {"_gt_masks", "_gt_ignore_masks"}
# Public dataset methods that take arguments, with how to call them.
CALLS_WITH_ARGS = {"get": lambda ds: [ds.get(i) for i in ds.image_ids()],
                   "category_name": lambda ds: [ds.category_name(c.id) for c in ds.categories],
                   "record_reject": lambda ds: ds.record_reject(InputError("probe.png", "probe")),
                   "record_depth_reject": lambda ds: ds.record_depth_reject(InputError("probe.png", "probe"))}


# ------------------------------------------------------------------------------------------ run time

def rle_counts(text: str) -> list[int] | None:
    """The counts of a COCO compressed-RLE string (pycocotools' ``rleFrString``); None when ``text`` is not
    one (a character outside the RLE alphabet, a run cut short, a negative count)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                return None
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            return None
        counts.append(x)
    return counts or None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def mask_like(value: Any, height: int, width: int, path: str = "") -> Iterator[str]:
    """Paths inside ``value`` of anything that can carry an instance mask of an ``height`` x ``width`` image:
    arrays spanning the image plane (any (..., H, W) or (H, W, ...) layout, any dtype), (P, 2) point arrays
    (P >= 3), COCO RLEs (bytes, a string that decodes to counts covering H * W pixels, a dict with
    "counts", a flat list of >= 6 numbers, which also covers flat COCO polygons) and lists of >= 3 [x, y]
    points."""
    if isinstance(value, np.ndarray):
        plane = value.ndim >= 2 and (value.shape[-2:] == (height, width) or value.shape[:2] == (height, width))
        points = value.ndim == 2 and value.shape[1] == 2 and value.shape[0] >= 3 and value.dtype.kind in "iuf"
        if plane or points:
            yield f"{path}: {'plane' if plane else 'points'} {value.dtype} {value.shape}"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        yield f"{path}: bytes (RLE counts?) of length {len(value)}"
    elif isinstance(value, str):
        counts = rle_counts(value)
        if counts is not None and sum(counts) == height * width:
            yield f"{path}: RLE counts string covering {height}x{width}"
    elif isinstance(value, dict):
        if "counts" in value:
            yield f"{path}: RLE dict with 'counts'"
        for k, v in value.items():
            yield from mask_like(v, height, width, f"{path}[{k!r}]")
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        if len(items) >= 6 and all(_is_number(v) for v in items):
            yield f"{path}: flat list of {len(items)} numbers (polygon or RLE counts)"
        elif len(items) >= 3 and all(isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_number, v))
                                     for v in items):
            yield f"{path}: list of {len(items)} [x, y] points (polygon)"
        else:
            for k, v in enumerate(items):
                yield from mask_like(v, height, width, f"{path}[{k}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from mask_like(getattr(value, f.name), height, width, f"{path}.{f.name}")


def allowed_plane(name: str, value: Any, height: int, width: int) -> bool:
    """The two image-plane values the API is meant to return: the RGB image and the float32 depth."""
    if not isinstance(value, np.ndarray):
        return False
    if name == "load_image":
        return value.shape == (height, width, 3) and value.dtype == np.uint8
    if name == "load_depth":
        return value.shape == (height, width) and value.dtype == np.float32
    return False


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
                result = member()
                if not allowed_plane(name, result, h, w):
                    found += mask_like(result, h, w, f"sample {sample.image_id}.{name}()")
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
                    try:
                        member = member()
                    except Exception as exc:  # noqa: BLE001 - a planted sample may break a method: report it
                        found.append(f"dataset.{name}() could not be checked: {type(exc).__name__}")
                        continue
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


def _planted_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[5:20, 10:30] = 1
    return mask


def _rle(height: int, width: int) -> dict:
    return mask_utils.encode(np.asfortranarray(_planted_mask(height, width)))


PLANTS = {
    "rle string": lambda h, w: _rle(h, w)["counts"].decode(),
    "rle bytes": lambda h, w: _rle(h, w)["counts"],
    "rle dict": lambda h, w: {"size": [h, w], "counts": _rle(h, w)["counts"].decode()},
    "uncompressed rle": lambda h, w: {"size": [h, w], "counts": [5, 10, h * w - 15]},
    "uncompressed counts list": lambda h, w: [110, 15, 25, 15, 25, 15, h * w - 205],
    "polygon points": lambda h, w: [[10, 5], [30, 5], [30, 20], [10, 20]],
    "coco polygon": lambda h, w: [[10.0, 5.0, 30.0, 5.0, 30.0, 20.0, 10.0, 20.0]],
    "point array": lambda h, w: np.array([[10, 5], [30, 5], [30, 20]], np.int32),
    "float plane": lambda h, w: _planted_mask(h, w).astype(np.float32) * 0.9,
    "uint16 id plane": lambda h, w: _planted_mask(h, w).astype(np.uint16) * 26000,
    "int32 crop stack": lambda h, w: np.zeros((2, h, w), np.int32),
}


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_leak_detector_finds_every_mask_encoding(tmp_path, kind):
    """Each way a mask can travel (RLE string / bytes / dict / counts, polygon, float or integer plane) is
    found in a public field, in a dataset attribute, returned by a public method and bound in a loader."""
    ds = CocoDataset(tmp_path, two_image_coco(tmp_path))
    sample = ds.get("2")
    h, w = sample.height, sample.width
    assert leaks(ds) == []
    sample.ignore_classes = [PLANTS[kind](h, w)]
    assert any("sample 2.ignore_classes[0]" in f for f in leaks(ds)), leaks(ds)
    sample.ignore_classes = np.zeros((0,), np.int32)
    ds.extra = PLANTS[kind](h, w)
    assert any(f.startswith("dataset.extra") for f in leaks(ds)), leaks(ds)
    del ds.extra
    planted = PLANTS[kind](h, w)
    sample._depth_loader = functools.partial(lambda value: value, planted)
    found = leaks(ds)
    assert any("sample 2._depth_loader" in f for f in found), found
    # A float32 plane returned by load_depth is a depth map as far as a scan can tell; bound in the loader
    # (above) it is still caught.
    if not allowed_plane("load_depth", planted, h, w):
        assert any("sample 2.load_depth()" in f for f in found), found


def test_leak_detector_allows_only_the_image_and_the_float32_depth(tmp_path):
    ds = CocoDataset(tmp_path, two_image_coco(tmp_path))
    sample = ds.get("2")
    h, w = sample.height, sample.width
    sample._depth_loader = lambda: np.ones((h, w), np.float32)              # a depth map: fine
    assert leaks(ds) == []
    sample._depth_loader = lambda: np.ones((h, w), np.uint8)                # a mask in its place: not
    assert any("load_depth()" in f for f in leaks(ds))
    sample._depth_loader = None
    sample._image_loader = lambda: np.ones((h, w), bool)
    assert any("load_image()" in f for f in leaks(ds))


def test_leak_detector_ignores_ordinary_strings(tmp_path):
    # Ids, names and paths are not RLE strings, even when made of RLE characters.
    assert list(mask_like(["1", "aachen_000000_000019", "person", "images/a.png", "0123"], 30, 50)) == []
    assert rle_counts(_rle(30, 50)["counts"].decode()) is not None
    assert sum(rle_counts(_rle(30, 50)["counts"].decode())) == 30 * 50


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


def test_the_student_never_imports_the_pipeline():
    modules = source_modules(REPO)
    student = [m for m in modules if m == "student" or m.startswith("student.")]
    assert "student.train" in student and "student.roi_heads" in student
    seen = reachable(student, modules)
    upward = sorted(m for m in seen if m == "pipeline" or m.startswith("pipeline."))
    assert upward == [], f"student reaches up into {upward[0]}: {chain(seen, upward[0])}" if upward else ""


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


# ------------------------------------------------------------------------------------------ training

def test_no_ground_truth_mask_reaches_training(tmp_path, monkeypatch):
    """Run time: the training job (what is pickled to the Ray Train workers) carries no mask, the targets the
    student trains on hold no image plane besides depth, and one training step runs with the dataset's
    ground-truth hooks booby-trapped."""
    import pickle

    import torch

    from pipeline.commands.common import config_path_for
    from pipeline.config import load_config
    from pipeline.training import build_job
    from student.data import TrainImages, collate
    from student.model import build_model

    monkeypatch.setenv("BOXMASK_CACHE", str(tmp_path / "cache"))

    def trap(*args, **kwargs):
        raise AssertionError("a ground-truth mask hook was called on the training path")

    for cls in (CityscapesDataset, CocoDataset):
        for hook in GT_HOOKS:
            monkeypatch.setattr(cls, hook, trap, raising=False)
    cfg = load_config(config_path_for("toy"), ["dataset.toy.size=64x128", "dataset.toy.train=2", "dataset.toy.val=0",
                                                "student.backbone=small", "student.fpn_channels=32",
                                                "student.box_head_dim=64", "student.min_size=[64]",
                                                "student.rois_per_image=16", "student.rpn_proposals=50"])
    job = build_job(cfg, str(tmp_path / "out"))
    job = pickle.loads(pickle.dumps(job))            # what the workers receive
    found = []
    for sample in job.samples:
        h, w = sample.height, sample.width
        for f in dataclasses.fields(sample):
            value = getattr(sample, f.name)
            value = bound_values(value) if f.name.startswith("_") and callable(value) else value
            found += mask_like(value, h, w, f"job sample {sample.image_id}.{f.name}")
    assert found == []
    data = TrainImages(job.samples, [c["id"] for c in job.classes], job.cfg)
    batch = [data[i] for i in range(len(data))]
    for image, target in batch:
        h, w = image.shape[1:]
        planes = {k for k, v in target.items() if torch.is_tensor(v) and tuple(v.shape[-2:]) == (h, w)}
        assert planes <= {"depth"}, planes
    model = build_model(job.cfg, len(job.classes)).train()
    losses = model(*collate(batch))
    assert torch.isfinite(sum(losses.values()))
