"""Safe checkpoints: round trip, architecture check, corrupt files, no code execution."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from skullrec.config import Config
from skullrec.errors import InputError
from skullrec.nets.autoencoder import build_model
from skullrec.nets.checkpoint import (
    architecture,
    load_checkpoint,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
    save_training_state,
)


def _tiny_cfg(**model: object) -> Config:
    cfg = Config()
    cfg.model.size = 16
    cfg.model.channels = [4, 8, 8]
    cfg.model.strides = [2, 2, 2]
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module, Config]:
    cfg = _tiny_cfg()
    model = build_model(cfg.model, seed=3)
    path = save_checkpoint(tmp_path / "m.safetensors", model, cfg, epoch=7, val_dsc={"eval_set1": 0.8})
    return path, model, cfg


def test_round_trip_restores_weights_config_and_meta(saved: tuple[Path, torch.nn.Module, Config]) -> None:
    path, model, cfg = saved
    loaded, cfg2, meta = load_checkpoint(path)
    assert cfg2 == cfg
    assert meta == {"epoch": 7, "val_dsc": {"eval_set1": 0.8}}
    assert not loaded.training
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = (torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # The stored tensors are exactly the state dict (an independent reader: plain safetensors).
    raw = load_file(str(path))
    assert all(torch.equal(raw[k], sd[k]) for k in sd)


def test_no_temporary_files_left(saved: tuple[Path, torch.nn.Module, Config]) -> None:
    path = saved[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]


def test_other_architecture_is_refused(saved: tuple[Path, torch.nn.Module, Config], tmp_path: Path) -> None:
    path, model, cfg = saved
    other = _tiny_cfg(channels=[4, 8, 16])
    with pytest.raises(InputError, match="is not the expected") as info:
        load_checkpoint(path, expect_architecture=architecture(other))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # A file whose recorded architecture is not what this version builds for its config.
    tensors, cfg_, arch, meta = read_checkpoint(path)
    bad = tmp_path / "bad_arch.safetensors"
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    header["architecture"] = json.dumps({"class": "SomethingElse"})
    save_file(tensors, str(bad), metadata=header)
    with pytest.raises(InputError, match=r"bad_arch\.safetensors: checkpoint architecture .*SomethingElse.* differs"):
        load_checkpoint(bad)


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    cfg = _tiny_cfg()
    wrong = build_model(_tiny_cfg(channels=[4, 8, 16]).model, seed=0)
    # save_checkpoint records cfg's architecture, but the tensors come from another model.
    path = save_checkpoint(tmp_path / "w.safetensors", wrong, cfg)
    with pytest.raises(InputError, match=r"w\.safetensors: weights do not fit architecture"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage", "missing"])
def test_damaged_checkpoint_is_an_input_error(saved: tuple[Path, torch.nn.Module, Config], damage: str) -> None:
    path = saved[0]
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # one byte of tensor data: only the checksum notices
        pos = len(data) - 100
        path.write_bytes(data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    else:
        path.unlink()
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg


def test_training_state_round_trip(tmp_path: Path) -> None:
    cfg = _tiny_cfg()
    model = build_model(cfg.model, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 1, 16, 16, 16)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "step": 1, "probes": gen.get_state(), "best_score": None}
    path = save_training_state(tmp_path / "state.pt", state)
    back = load_training_state(path)
    assert back["epoch"] == 3 and back["step"] == 1 and back["best_score"] is None
    assert torch.equal(back["probes"], gen.get_state())
    opt2 = torch.optim.Adam(build_model(cfg.model, seed=2).parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg_sq"], opt2.state_dict()["state"][k]["exp_avg_sq"])


class _Evil:
    """Unpickling this would run a shell command (what weights_only loading must refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.marker}",))


def test_training_state_never_executes_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "state.pt"
    torch.save({"format": "skullrec-training-state/1", "payload": _Evil(marker)}, path)
    with pytest.raises(InputError, match=r"state\.pt: not a skullrec training state: it holds Python objects") as err:
        load_training_state(path)
    assert not marker.exists()
    assert "weights_only" not in str(err.value) and "corrupt" not in str(err.value)  # no torch hint to unpickle it
    # Sanity check of the test itself: a plain unpickler would have run the command.
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        pickle.loads(z.read(pkl))
    assert marker.exists()


def test_damaged_training_state_is_an_input_error(tmp_path: Path) -> None:
    path = save_training_state(tmp_path / "state.pt", {"epoch": 1, "w": torch.zeros(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match=r"state\.pt: corrupt or truncated training state"):
        load_training_state(path)
    with pytest.raises(InputError, match="no training state"):
        load_training_state(tmp_path / "nope.pt")
