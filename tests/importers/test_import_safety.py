"""Checkpoints are read with torch.load(weights_only=True) or safetensors only: a file that
would run code when unpickled is refused, and nothing from it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from upstream_nets import DeepHashResNet

from service.cli import main
from service.errors import CorruptData
from service.importers.checkpoint import UnsafeCheckpoint, read_state_dict


def plant_marker(path: str) -> None:
    """What the planted payload runs when unpickled: it creates a file."""
    Path(path).write_text("the checkpoint ran code")


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return plant_marker, (self.marker,)


def test_a_checkpoint_that_runs_code_on_load_is_refused_and_nothing_runs(
        tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    state = DeepHashResNet(8, 18).state_dict()
    ckpt = tmp_path / "model.pt"
    torch.save({"state_dict": state, "note": Payload(str(marker))}, ckpt)

    with pytest.raises(UnsafeCheckpoint) as info:
        read_state_dict(ckpt)
    assert info.value.field == "checkpoint"
    assert "nothing from the file ran" in info.value.message
    assert "plant_marker" in info.value.message  # names the global it would have called
    assert not marker.exists()

    store = tmp_path / "store"
    assert main(["import", "deephash", "--arch", "ResNet18", "--checkpoint", str(ckpt),
                 "--name", "evil", "--store", str(store)]) == 2
    assert "was refused" in capsys.readouterr().err
    assert not marker.exists() and not (store / "evil").exists()

    # the payload is live: full unpickling (which HashAudit never does) runs it
    torch.load(ckpt, weights_only=False)
    assert marker.read_text() == "the checkpoint ran code"


def test_a_whole_pickled_model_is_refused_with_how_to_save_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "whole.pth"
    torch.save(DeepHashResNet(8, 18), ckpt)  # ProS-GAN saves its models this way
    with pytest.raises(UnsafeCheckpoint, match=r"torch\.save\(model\.state_dict\(\)"):
        read_state_dict(ckpt)


def test_files_that_are_not_state_dicts_are_named(tmp_path: Path) -> None:
    txt = tmp_path / "notes.pt"
    txt.write_text("not a checkpoint")
    with pytest.raises(CorruptData, match="notes.pt is not a readable torch checkpoint"):
        read_state_dict(txt)
    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "lr": 0.1}, odd)
    with pytest.raises(CorruptData, match="entry 'epoch' holds a int"):
        read_state_dict(odd)
    st = tmp_path / "bad.safetensors"
    st.write_bytes(b"\x00" * 16)
    with pytest.raises(CorruptData, match="bad.safetensors"):
        read_state_dict(st)
    with pytest.raises(CorruptData, match="no entry 'net'"):
        torch.save({"model": DeepHashResNet(8, 18).state_dict()}, tmp_path / "w.pt")
        read_state_dict(tmp_path / "w.pt", state_key="net")
