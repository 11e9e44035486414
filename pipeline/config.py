"""The one config system: YAML files and ``--set section.key=value`` overrides into typed dataclasses.

Unknown keys are errors that name the closest valid key; values are checked against the field types.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from student.config import StudentConfig
from teacher.config import TeacherConfig

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ToyConfig:
    """Generated Cityscapes-layout data (``pipeline make-toy`` and ``--dataset toy``)."""

    train: int = 24
    val: int = 8
    seed: int = 0
    size: str = "256x512"             # HxW
    cache_dir: str = ""               # default: $BOXMASK_CACHE or ~/.cache/boxmask/toy-<params>


@dataclass
class DatasetConfig:
    name: str = "toy"                 # toy | cityscapes | coco | openimages (openimages: `pipeline index` only)
    root: str = ""                    # --data-root; cityscapes falls back to $CITYSCAPES_DATASET
    ann: str = ""                     # COCO annotation json; OpenImages boxes CSV
    classes: str = ""                 # OpenImages class-descriptions CSV
    split: str = "train"
    strict: bool = False              # stop at the first bad item instead of skipping it
    min_box_side: float = 1.0         # boxes thinner than this (px) are rejected as degenerate
    # COCO: the fraction of images held out of training for the student's evaluation, picked by a hash of the
    # image id (stable when images are added). The training split reads the rest; the evaluation reads these
    # (split "holdout") unless evaluation.ann names another file. 0 = train and evaluate on the one file.
    holdout: float = 0.0
    toy: ToyConfig = field(default_factory=ToyConfig)


@dataclass
class LabelConfig:
    """The Ray label service."""

    workers: int | Literal["auto"] = "auto"  # auto: as many as the cluster's CPUs (GPUs, for a GPU teacher) allow
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = -1.0     # negative = auto: min(1, cluster GPUs / workers), 0 without GPUs or with
                                      # teacher.device=cpu; 0 or more is used as given
    batch_images: int = 4             # images handed to a worker at a time
    max_inflight: int = 2             # batches queued per worker (1 running + 1 ready keeps it busy)
    shard_rows: int = 2000            # a shard is written once this many rows are buffered (and at the end)
    max_attempts: int = 3             # times an image is lost (its worker died, or its batch timed out) before
                                      # it is rejected (Ray Data restarts a dead worker without limit)
    batch_timeout_s: float = 600.0    # a batch not back this long after its worker began it ends that worker,
                                      # and Ray Data restarts it and redoes the batch (a hung worker does not
                                      # stall the run); set it well above the slowest batch


@dataclass
class EvalConfig:
    """The evaluate stage of ``pipeline run`` (and the split ``pipeline eval`` defaults to)."""

    split: str = "val"                # split the student's mask AP is measured on
    ann: str = ""                     # COCO: annotation json of that split; "" = the training file (not held out)
    limit: int = 0                    # evaluate the student on the first N images only (0 = all)
    min_box_side: float = 8.0         # pseudo-label IoU leaves out instances with a box side under this (px)
    gallery: int = 12                 # best and worst pseudo labels (by IoU) drawn in the report


@dataclass
class RunConfig:
    """``pipeline run``: the self-training rounds (DESIGN.md section 2)."""

    name: str = "default"             # the run folder is <root>/<name> unless --out names one
    root: str = "runs"
    rounds: int = 3                   # trained rounds after the box-prior round 0
    warm_start: bool = True           # round r >= 2 trains from round r-1's teacher weights (false: fresh init)
    finetune_iterations: int = 0      # steps of a warm-started round (0 = student.iterations); warm-up, lr steps
                                      # and ramps shrink in proportion
    address: str = ""                 # Ray address; empty = $RAY_ADDRESS or a local cluster
    dashboard_host: str = "127.0.0.1"


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with the few int->float / str->number conversions a
    YAML or command-line user expects)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(where, f"expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(where, "; ".join(errors))
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        # YAML 1.1 reads a bare off / on as false / true; a choice spelled that way means the word.
        if isinstance(value, bool) and ("on" if value else "off") in choices:
            return "on" if value else "off"
        if value in choices and not isinstance(value, bool):
            return value
        raise ConfigError(where, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(where, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(where, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(where, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(where, f"expected a string, got {value!r}")
    return value


def _unknown_key(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    prefix = "" if where == "config" else f"{where}."
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(where, f"unknown key '{key}'{hint}")


def _build(cls: type, data: dict, where: str = "config") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise _unknown_key(cls, str(key), where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where != "config" else key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError("--set", f"'{item}' is not of the form section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError("--set", f"'{item}' names no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def override_keys(overrides: Iterable[str]) -> set[str]:
    """The dotted keys that ``--set`` overrides name, read as ``load_config`` reads them."""
    return {".".join(_parse_override(item)[0]) for item in overrides}


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, "config file not found") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(path, f"malformed YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(path, "a config file must be a mapping of sections")
    return data


def config_path_for(dataset: str) -> Path:
    """The shipped config for a dataset name (``configs/<name>.yaml``)."""
    return CONFIG_DIR / f"{dataset}.yaml"


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                extra: dict | None = None) -> Config:
    """Defaults <- YAML file <- ``extra`` (from dedicated CLI flags) <- ``--set`` overrides."""
    data: dict = {}
    source = "config"
    if path:
        data = read_yaml(path)
        source = os.fspath(path)
    if extra:
        data = _merge(data, extra)
    for item in overrides:
        keys, value = _parse_override(item)
        # Checked on its own first, so that a bad override is reported as the --set it came from rather
        # than as a fault of the YAML file it is merged into.
        try:
            _build(Config, _nest(keys, value))
        except ConfigError as exc:
            at = "" if exc.where == "config" else f"{exc.where}: "
            raise ConfigError("--set", f"'{item}': {at}{exc.problem}") from None
        data = _merge(data, _nest(keys, value))
    try:
        return _build(Config, data)
    except ConfigError as exc:
        if source != "config":
            raise ConfigError(source, f"{exc.where}: {exc.problem}") from None
        raise


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_digest(cfg: Any) -> str:
    """Stable short digest of a config section, for shard metadata and resume checks."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
