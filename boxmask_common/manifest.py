"""Reading the manifest of a shard directory: ``_manifest.json`` and its journal ``_manifest.jsonl``.

``_manifest.json`` holds ``{"meta": {...}, "shards": [entry, ...]}``. A commit does not rewrite it: that grows with
every image finished, and at a million images rewriting it per shard costs hours of driver time and tens of GB
of writes. A commit appends its entry as one line to the journal instead, and the writer folds the journal into
``_manifest.json`` (replaced atomically, then the journal deleted) when the journal has grown as long as the
manifest, and when a run ends. So a finished run leaves the whole list in ``_manifest.json``; while a run writes,
or after one was killed, the newest shards are in the journal.

Reading merges the two. A journal entry whose file the manifest already lists is a fold cut short between its two
steps and is skipped. A last line without its newline is a commit cut short: its shard is not finished. Both
files start with ``_``, so Parquet readers of the directory skip them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UserError

MANIFEST = "_manifest.json"
JOURNAL = "_manifest.jsonl"


def read_journal(out_dir: str | os.PathLike) -> list[dict]:
    """The shard entries of the journal of ``out_dir`` in commit order ([] when there is none); a torn last line
    is left out. ``UserError`` naming the journal for a complete line that is not a json object with a
    "file"."""
    path = Path(out_dir) / JOURNAL
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UserError(path, f"unreadable manifest journal ({exc.strerror})") from None
    entries = []
    for n, line in enumerate(data.split(b"\n")[:-1], 1):        # the part after the last newline is torn
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(path, f"malformed manifest journal line {n} ({exc})") from None
        if not isinstance(entry, dict) or not entry.get("file"):
            raise UserError(path, f"malformed manifest journal line {n} (expected an object with a 'file')")
        entries.append(entry)
    return entries


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """``{"meta": {...}, "shards": [entry, ...]}`` of a shard directory, the journal's entries after the
    manifest's; ``UserError`` when there is no manifest or either file is malformed. Safe while a writer
    commits and folds: a read that a fold overtook is read again."""
    path = Path(out_dir) / MANIFEST
    for _ in range(100):
        data, identity = _read_json(out_dir, path)
        journal = read_journal(out_dir)
        try:
            if _identity(path) == identity:
                break
        except FileNotFoundError:
            pass
    listed = {entry["file"] for entry in data["shards"]}
    data["shards"].extend(e for e in journal if e["file"] not in listed)
    return data


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def _read_json(out_dir: str | os.PathLike, path: Path) -> tuple[dict, tuple[int, int]]:
    """The manifest's content and the identity of the file read (a fold replaces it by another file)."""
    try:
        with open(path, "rb") as f:
            identity = os.fstat(f.fileno())
            data = json.loads(f.read())
    except FileNotFoundError:
        raise UserError(out_dir, f"not a shard directory (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(path, f"malformed manifest ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("shards"), list) or "meta" not in data:
        raise UserError(path, "malformed manifest (expected keys 'meta' and 'shards')")
    for entry in data["shards"]:
        if not isinstance(entry, dict) or not entry.get("file"):
            raise UserError(path, f"malformed manifest entry {str(entry)[:80]!r}")
    return data, (identity.st_ino, identity.st_mtime_ns)
