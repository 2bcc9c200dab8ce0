"""Checkpoint files, manifest and the three retention tracks (in-process, real files)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlnest_jupyter.checkpoint import Checkpoints
from dlnest_jupyter.errors import DLNestError


def _policy(fast=2, slow=0, dilation=100, kept=1):
    return {"max_ckpt_in_fast_track": fast, "max_ckpt_in_slow_track": slow,
            "dilation_in_slow_track": dilation, "max_ckpt_in_consistent_track": kept}


def _files(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("*.ckpt"))


def test_retention_keeps_exactly_what_the_tracks_say(tmp_path: Path):
    ck = Checkpoints(tmp_path, _policy(fast=2, slow=2, dilation=3, kept=2))
    held = {2, 4, 9}
    for epoch in range(1, 13):
        ck.save({"w": torch.tensor([float(epoch)])}, epoch, epoch * 10, hold=epoch in held)
    # fast: 11, 12; slow (multiples of 3, newest 2): 9, 12; kept (newest 2 of 2, 4, 9): 4, 9
    assert ck.epochs() == [4, 9, 11, 12] == _files(tmp_path)
    tracks = {e["epoch"]: sorted(e["tracks"]) for e in ck.entries()}
    assert tracks == {4: ["kept"], 9: ["kept", "slow"], 11: ["fast"], 12: ["fast", "slow"]}
    assert ck.load()["w"].item() == 12.0 and ck.load(4)["w"].item() == 4.0
    assert json.loads((tmp_path / "manifest.json").read_text())["latest"] == 12


def test_newest_checkpoint_survives_even_with_no_track(tmp_path: Path):
    ck = Checkpoints(tmp_path, _policy(fast=0, kept=0))
    for epoch in (1, 2, 3):
        ck.save({"w": torch.zeros(1)}, epoch, epoch)
    assert ck.epochs() == [3] == _files(tmp_path)


def test_background_save_lands_and_copies_state_first(tmp_path: Path):
    ck = Checkpoints(tmp_path, _policy())
    w = torch.ones(1000)
    ck.save_in_background({"w": w}, 1, 1)
    w.add_(1)  # training goes on mutating the live tensor
    ck.wait()
    assert torch.equal(ck.load()["w"], torch.ones(1000))


def test_host_copy_keeps_state_dict_types_and_shared_tensors():
    from dlnest_jupyter.checkpoint import to_host

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    net[1].weight = net[0].weight  # tied weights
    sd = net.state_dict()
    copy = to_host({"net": sd, "rng": (1, 2, 3)})
    assert type(copy["net"]) is type(sd) and copy["net"]._metadata == sd._metadata
    w0, w1 = copy["net"]["0.weight"], copy["net"]["1.weight"]
    assert w0.untyped_storage().data_ptr() == w1.untyped_storage().data_ptr()  # still tied
    assert w0.data_ptr() != sd["0.weight"].data_ptr() and torch.equal(w0, sd["0.weight"])
    assert torch.equal(copy["net"]["0.bias"], sd["0.bias"]) and copy["net"]["0.bias"].data_ptr() != sd["0.bias"].data_ptr()
    assert copy["rng"] == (1, 2, 3)


def test_missing_and_broken_checkpoints_are_clear_errors(tmp_path: Path):
    ck = Checkpoints(tmp_path, _policy())
    with pytest.raises(DLNestError, match="no complete checkpoint"):
        ck.load()
    ck.save({"w": torch.zeros(1)}, 1, 1)
    ck.save({"w": torch.zeros(1)}, 2, 2)
    with pytest.raises(DLNestError, match=r"no checkpoint for epoch 7 \(available: 1, 2\)"):
        ck.load(7)
    (tmp_path / "epoch_000002.ckpt").write_bytes(b"garbage")
    with pytest.raises(DLNestError, match="epoch_000002.ckpt: checkpoint is unreadable"):
        ck.load()
    (tmp_path / "epoch_000001.ckpt").unlink()
    with pytest.raises(DLNestError, match="epoch_000001.ckpt: checkpoint file is missing"):
        ck.load(1)


def test_rewind_moves_newer_checkpoints_aside(tmp_path: Path):
    ck = Checkpoints(tmp_path, _policy(fast=5))
    for epoch in (1, 2, 3, 4):
        ck.save({"w": torch.tensor([float(epoch)])}, epoch, epoch)
    ck.rewind(2, attempt=2)
    assert ck.epochs() == [1, 2] and ck.load()["w"].item() == 2.0
    assert sorted(p.name for p in (tmp_path / "abandoned" / "attempt_2").iterdir()) == [
        "epoch_000003.ckpt", "epoch_000004.ckpt"]
