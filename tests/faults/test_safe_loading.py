"""Issue 5.6: checkpoints and run folders are read as data only. A crafted pickle whose
unpickling would create a marker file is given as a backbone checkpoint and as a run's heads
file: the marker never appears and the error says what was refused. Issue 12.5: the wrong
files users actually give as a checkpoint (an interrupted download, a text file, a Git LFS
pointer) are one line naming the file and the problem, through the command line."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qamro_pipe.errors import QamroError
from qamro_pipe.extract.backbones import get_backbone
from qamro_pipe.train.runs import load_run

from kit.children import extract_args

PACKAGE = Path(__file__).resolve().parents[2] / "qamro_pipe"


class Payload:
    """Unpickling this calls open(marker, "w"): creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(path: Path, marker: Path, torch_format: bool) -> Path:
    obj = {"state_dict": {"w": Payload(marker)}, "model_cfg": {}}
    if torch_format:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


def test_the_payload_is_live(tmp_path, tally):
    """The check below means something: plain unpickling does run the payload."""
    tally.fault, tally.in_process, tally.runs = "control: plain pickle.loads runs the payload " \
                                                "(marker appears)", True, 1
    marker = tmp_path / "proof"
    pickle.loads(_crafted(tmp_path / "x.pkl", marker, False).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("backbone, torch_format", [
    ("aesthetics", True), ("aesthetics", False), ("clap-music", True), ("clap-music", False)])
def test_crafted_checkpoint_is_refused_without_running_it(tmp_path, tally, monkeypatch,
                                                          backbone, torch_format):
    tally.fault = f"crafted pickle as --checkpoint of {backbone} " \
                  f"({'torch.save' if torch_format else 'raw pickle'})"
    tally.in_process, tally.runs = True, 1
    if backbone == "clap-music":
        # ClapMusic.load builds HTSAT + RoBERTa (about 5 s) before it reads the checkpoint;
        # what is under test is the reading, so the build is replaced by a stand-in
        from qamro_pipe.extract.backbones import clap

        monkeypatch.setattr(clap, "build_clap", lambda amodel: (torch.nn.Linear(1, 1), {}))
    marker = tmp_path / "pwned"
    ckpt = _crafted(tmp_path / "evil.pt", marker, torch_format)
    expected = (rf"{backbone}: cannot read checkpoint .*evil\.pt as plain weights: it holds "
                rf"pickled io\.open \(refused for safety" if torch_format else
                rf"{backbone}: checkpoint .*evil\.pt: not a PyTorch checkpoint \(a pickle "
                rf"that torch\.save did not write")
    with pytest.raises(QamroError, match=expected):
        get_backbone(backbone, checkpoint=str(ckpt), offline=True).load()
    assert not marker.exists()


def test_numpy_scalars_are_unpickled_and_nothing_else_numpy(tmp_path, tally):
    """What LAION-CLAP's training checkpoints hold besides tensors (the optimizer's learning
    rate, a numpy float64 from training/scheduler.py cosine_lr) is read; a numpy array,
    whose unpickling is not limited to data, is still refused, and named."""
    from qamro_pipe.checkpoints import read_checkpoint

    tally.fault = "numpy float64 in a checkpoint read; numpy array refused, named"
    tally.in_process, tally.runs = True, 2
    torch.save({"optimizer": {"param_groups": [{"lr": np.float64(2.5e-5)}]}}, tmp_path / "a.pt")
    lr = read_checkpoint(tmp_path / "a.pt", "clap-music")["optimizer"]["param_groups"][0]["lr"]
    assert type(lr) is np.float64 and lr == 2.5e-5
    torch.save({"optimizer": {"lr": np.ones(2)}}, tmp_path / "b.pt")
    with pytest.raises(QamroError, match=r"b\.pt as plain weights: it holds pickled "
                                         r"numpy\.core\.multiarray\._reconstruct, "
                                         r"numpy\.ndarray \(refused for safety"):
        read_checkpoint(tmp_path / "b.pt", "clap-music")


def _empty(path: Path) -> str:
    path.write_bytes(b"")
    return "empty file (0 bytes): interrupted download?"


def _text(path: Path) -> str:
    path.write_text("epoch: 15\nlr: 5e-4\n")
    return "not a PyTorch checkpoint (text starting b'epoch: 15"


def _lfs_pointer(path: Path) -> str:
    """What `git clone https://huggingface.co/lukewys/laion_clap` leaves without git-lfs: the
    pointer file of the Git LFS spec (github.com/git-lfs/git-lfs, docs/spec.md), here with
    the music checkpoint's sha256 and size as other projects record them."""
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:fae3e9c087f2909c28a09dc31c8dfcdacbc42ba44c70e972b58c1bd1caf6dedd\n"
                    "size 2352471003\n")
    return "not a PyTorch checkpoint (a Git LFS pointer"


def _cut_off(path: Path) -> str:
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    return "truncated or damaged zip archive"


BAD_CHECKPOINTS = {"0-byte checkpoint (interrupted download)": _empty,
                   "text file as checkpoint": _text,
                   "Git LFS pointer as checkpoint": _lfs_pointer,
                   "checkpoint cut off mid-download": _cut_off}


@pytest.mark.parametrize("backbone", ["clap-music", "aesthetics"])
@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_wrong_file_as_checkpoint_is_one_line(corpus, tmp_path, tally, backbone, case):
    """Through `qamro-pipe extract`: exit 1, one stderr line with the file's path and the
    real problem, no cache written (the file is checked before anything is)."""
    tally.fault = f"{case}, {backbone}"
    ckpt = tmp_path / "ckpt.pt"
    problem = BAD_CHECKPOINTS[case](ckpt)
    out = tmp_path / "c.h5"
    c = tally.invoke(extract_args(corpus, out, "--checkpoint", ckpt, backbone=backbone))
    assert c.proc.returncode == 1, c.stderr
    assert len(c.err) == 1, c.stderr
    assert c.err[0].startswith(f"error: {backbone}: checkpoint {ckpt}: {problem}"), c.stderr
    assert not out.exists()


def test_crafted_heads_file_in_a_run_folder_is_refused(tmp_path, tally):
    tally.fault = "crafted pickle as a run folder's heads file and config"
    tally.in_process, tally.runs = True, 3
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"qamro_run_version": 1}))
    (run / "metrics.json").write_text("{}")
    (run / "predictions.csv").write_text("id\n")
    _crafted(run / "heads.safetensors", marker, torch_format=True)
    with pytest.raises(QamroError, match="heads.safetensors: not a valid safetensors file"):
        load_run(run)
    _crafted(run / "heads.safetensors", marker, torch_format=False)
    with pytest.raises(QamroError, match="never pickles"):
        load_run(run)
    _crafted(run / "config.json", marker, torch_format=False)
    with pytest.raises(QamroError, match="config.json: not valid JSON"):
        load_run(run)
    assert not marker.exists()


def test_no_code_path_unpickles(tally):
    """Every torch.load in the package says weights_only=True; nothing imports pickle."""
    tally.fault, tally.in_process = "static: every torch.load has weights_only=True, " \
                                    "no pickle import", True
    for py in PACKAGE.rglob("*.py"):
        text = py.read_text()
        assert not re.search(r"^\s*(import|from) (pickle|dill|joblib)\b", text, re.M), py
        for call in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call, (py, call)
            tally.runs += 1  # torch.load calls checked
