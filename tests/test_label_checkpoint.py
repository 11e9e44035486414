"""Teacher checkpoints for the label service: loaded with ``weights_only=True`` on the driver, a bad file refused in
one line before any data is made or Ray starts."""
from __future__ import annotations

import collections

import pytest

from pipeline.errors import UserError
from pipeline.label_service.checkpoint import load_checkpoint


def test_checkpoints_load_safely_or_fail_in_one_line(tmp_path, capsys):
    import torch

    from pipeline.cli import main

    unknown = tmp_path / "unknown.pt"
    torch.save({"network": "mystery-net", "state_dict": {"w": torch.zeros(2)}}, unknown)
    with pytest.raises(UserError, match=r"unknown.pt: checkpoint names network 'mystery-net'"):
        load_checkpoint(unknown)
    torch.save({"state_dict": {}}, tmp_path / "anon.pt")
    with pytest.raises(UserError, match="anon.pt: checkpoint does not name its network"):
        load_checkpoint(tmp_path / "anon.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.pt: refused: cannot load the checkpoint with weights_only=True"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"network": collections.OrderedDict, "x": object()}, tmp_path / "pickle.pt")  # not weights-only
    with pytest.raises(UserError, match="pickle.pt: refused: cannot load the checkpoint with weights_only=True"):
        load_checkpoint(tmp_path / "pickle.pt")
    # The CLI refuses before generating data or starting Ray.
    assert main(["label", "--out", str(tmp_path / "out"), "--checkpoint", str(unknown)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown.pt: checkpoint names network 'mystery-net'" in err[0]
    assert not (tmp_path / "out").exists()
