"""Issue 20: run folders whose files do not belong together, crafted config.json files, a
run evaluated from another folder, and label names a run folder cannot carry: one line each,
or the right cache, never another run's weights averaged in or another corpus scored."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kit.caches import make_synthetic_cache
from kit.hostile import cli, one_line_error, tree_digest

SMALL = dict(n_systems=4, per_system=6, dim=8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-runs")
    cache = make_synthetic_cache(root / "c.h5", **SMALL)
    r = cli("train", "--cache", cache, "--out", root / "run", "--max-epochs", "2")
    assert r.exit_code == 0, r.output
    return root / "run"


def _heads(edit):
    def mutate(folder):
        tensors = load_file(str(folder / "heads.safetensors"))
        edit(tensors)
        save_file(tensors, str(folder / "heads.safetensors"))
    return mutate


def _config(edit):
    def mutate(folder):
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return mutate


def _extra_member(t):
    for k in [k for k in t if "/m0/" in k]:
        t[k.replace("/m0/", "/m1/")] = t[k] + 100  # a second member config.json never had


def _wrong_shape(t):
    k = next(k for k in t if k.endswith("weight"))
    t[k] = torch.zeros(3, 3)


def _nested(folder):
    (folder / "config.json").write_text('{"qamro_run_version": 1, "x": ' + "[" * 100_000
                                        + "]" * 100_000 + "}")


CRAFTED = {
    "extra member in heads.safetensors": (_heads(_extra_member), "tensor 'overall/m1/"),
    "foreign tensor key": (_heads(lambda t: t.update(evil=torch.zeros(1))), "tensor 'evil'"),
    "weights of the wrong shape": (_heads(_wrong_shape), "does not fit the head"),
    "config.json without heads": (_config(lambda c: c.pop("heads")), "'heads' must be"),
    "config.json with members: []": (_config(lambda c: c.update(members=[])), "'members' must"),
    "config.json nested 100,000 deep": (_nested, "not valid JSON"),
    "head with a foreign setting": (_config(lambda c: c["heads"][0].update(evil=1)),
                                    "head settings not readable"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_run_folders_are_one_line(case, run, tmp_path, tally):
    tally.fault = f"run folder: {case} (evaluate, predict)"
    tally.in_process = True
    mutate, expect = CRAFTED[case]
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    mutate(folder)
    before = tree_digest(folder)
    uses = [["evaluate", folder]]
    if case != "weights of the wrong shape":  # (predict meets them only once audio is embedded)
        uses.append(["predict", folder, tmp_path / "none.wav"])
    for args in uses:
        tally.runs += 1
        one_line_error(cli(*args), expect)
    assert tree_digest(folder) == before


def test_a_run_evaluated_from_another_folder_scores_its_own_cache(tmp_path, monkeypatch, tally):
    """Trained with a relative --cache, evaluated from a folder holding another file at that
    relative path: the other corpus was scored, exit 0, and written into the run."""
    tally.fault = "run trained with a relative --cache, evaluated elsewhere (cache identity)"
    tally.in_process = True
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_synthetic_cache(tmp_path / "a" / "c.h5", **SMALL)
    other = make_synthetic_cache(tmp_path / "b" / "c.h5", **SMALL, seed=7)
    monkeypatch.chdir(tmp_path / "a")
    tally.runs += 1
    assert cli("train", "--cache", "c.h5", "--out", tmp_path / "run",
               "--max-epochs", "2").exit_code == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cache"] == str(tmp_path / "a" / "c.h5")  # recorded absolute
    monkeypatch.chdir(tmp_path / "b")
    tally.runs += 1
    r = cli("evaluate", tmp_path / "run")
    assert r.exit_code == 0, r.output
    [ev] = (tmp_path / "run" / "evaluations").iterdir()
    assert json.loads((ev / "metrics.json").read_text())["cache"] == str(tmp_path / "a" / "c.h5")
    # the file at the recorded path replaced by another corpus's cache: refused by identity
    shutil.rmtree(tmp_path / "run" / "evaluations")
    shutil.copy(other, tmp_path / "a" / "c.h5")
    tally.runs += 1
    one_line_error(cli("evaluate", tmp_path / "run"), "not the cache run",
                   f"pass --cache {tmp_path / 'a' / 'c.h5'}")
    assert not (tmp_path / "run" / "evaluations").exists()
    tally.runs += 1
    assert cli("evaluate", tmp_path / "run", "--cache", other).exit_code == 0  # when asked


def test_a_label_name_with_a_slash_is_refused_at_extract(corpus, tmp_path, tally):
    """A manifest score column `a/b` trained, then evaluate and predict died with
    `invalid literal for int()` (weights are named HEAD/mK/...)."""
    tally.fault = "label name with '/' (manifest column a/b): refused at extract"
    tally.in_process = tally.runs = 1
    wav = sorted((corpus / "wav").iterdir())[0]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path,a/b\nx,{wav},3.0\n")
    one_line_error(cli("extract", "--manifest", manifest, "--backbone", "melstats",
                       "--device", "cpu", "--quiet", "--out", tmp_path / "c.h5"),
                   "label name 'a/b'", "holds '/'")
    assert not (tmp_path / "c.h5").exists()


def test_duplicate_label_names_are_refused(tmp_path, tally):
    """Two labels with one name trained two heads of which one set of weights survived."""
    tally.fault = "two labels with one name (crafted cache): train"
    tally.in_process = tally.runs = 1
    cache = make_synthetic_cache(tmp_path / "c.h5", **SMALL, label_names=["mos", "mos"])
    one_line_error(cli("train", "--cache", cache, "--out", tmp_path / "r"), "appears twice")
