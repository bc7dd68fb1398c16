"""Issue 5.6: checkpoints and run folders are read as data only. A crafted pickle whose
unpickling would create a marker file is given as a backbone checkpoint and as a run's heads
file: the marker never appears and the error says what was refused."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from qamro_pipe.extract.backbones import get_backbone
from qamro_pipe.errors import QamroError
from qamro_pipe.train.runs import load_run

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
    with pytest.raises(QamroError, match=rf"{backbone}: cannot read checkpoint .*evil\.pt "
                                         rf"as plain weights"):
        get_backbone(backbone, checkpoint=str(ckpt), offline=True).load()
    assert not marker.exists()


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
