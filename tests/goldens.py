"""Reference arrays from `../shared/goldens` (see its README), or the copies of the small ones in `tests/data`
when the shared folder is not beside the checkout; a test whose golden is in neither place is skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "goldens"
LOCAL = Path(__file__).resolve().parent / "data"


def load_golden(name: str):
    """The npz archive `name` (".npz" optional), as `np.load` returns it."""
    name = name if name.endswith(".npz") else f"{name}.npz"
    for folder in (SHARED, LOCAL):
        if (folder / name).is_file():
            return np.load(folder / name)
    pytest.skip(f"golden {name} not found (neither ../shared/goldens nor tests/data holds it)")


def golden_tensors(name: str) -> dict:
    """The arrays of a DiscoBox golden as tensors, plus "meta": its decoded `meta_json`."""
    z = load_golden(name)
    out = {k: torch.from_numpy(z[k]) for k in z.files if k != "meta_json"}
    out["meta"] = json.loads(str(z["meta_json"]))
    return out
