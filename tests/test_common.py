"""The shared plumbing (boxmask_common): an atomic write leaves the old file whole when it fails, the safe load
refuses pickle payloads in one line, and the one-line summary drops colour codes and keeps to its limit."""
from __future__ import annotations

import pickle

import pytest
import torch

from boxmask_common.errors import UserError, one_line
from boxmask_common.files import atomic_path, atomic_write_text, load_weights_only


def test_an_atomic_write_that_fails_leaves_the_old_content_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_the_safe_load_refuses_a_pickle_payload_and_a_cut_copy_in_one_line(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(load_weights_only(good)["w"], torch.ones(2))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": _Payload()}))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:40])
    for path in (evil, cut):
        with pytest.raises(UserError) as err:
            load_weights_only(path, "weights")
        text = str(err.value)
        assert text.startswith(f"{path}: refused: cannot load the weights with weights_only=True")
        assert "\n" not in text and "\x1b" not in text
    with pytest.raises(UserError, match="missing.pt: checkpoint file not found"):
        load_weights_only(tmp_path / "missing.pt")


def test_one_line_takes_the_first_or_last_line_without_colour_and_within_the_limit():
    exc = RuntimeError("\n  \x1b[1mfirst\x1b[0m line\nsecond\ncause: the last one\n")
    assert one_line(exc) == "RuntimeError: first line"
    assert one_line(exc, last=True) == "RuntimeError: cause: the last one"
    assert one_line(ValueError()) == "ValueError"
    long = one_line(ValueError("x" * 500), limit=50)
    assert len(long) == 50 and long.endswith("...")
    err = UserError("a/file.pt", "two\n  lines")
    assert str(err) == "a/file.pt: two lines" and (err.where, err.problem) == ("a/file.pt", "two lines")
