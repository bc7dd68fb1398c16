"""Grouped K-fold cross-validation (--cv): the folds, what each fold trains and stops on, how
folds combine, the folder, and resuming fold by fold."""
import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from sklearn.model_selection import GroupKFold
from typer.testing import CliRunner

from qamro_pipe.cli import app
from qamro_pipe.config import CVConfig, LossConfig, Member, TrainConfig
from qamro_pipe.errors import QamroError
from qamro_pipe.experiments.cv import HELD_OUT, fold_out, fold_view, make_folds
from qamro_pipe.experiments.run import run_experiment
from qamro_pipe.metrics import evaluate
from qamro_pipe.store import read_cache, write_cache
from qamro_pipe.train.recipes import load_recipe
from qamro_pipe.train.resume import fingerprint, partial_dir
from qamro_pipe.train.runs import load_run
from qamro_pipe.train.trainer import make_split

from kit.caches import make_synthetic_cache

RECIPE = load_recipe("musiceval")
HEADS = RECIPE.heads
FAST = TrainConfig(max_epochs=8, bootstrap=20, batch_size=64, lr=0.01)
MEMBERS = [Member(LossConfig(), s) for s in (0, 1)]


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    return make_synthetic_cache(tmp_path_factory.mktemp("cv") / "synthetic.h5")


def test_folds_are_disjoint_grouped_by_system_and_cover_every_clip_once(cache_path):
    cache = read_cache(cache_path)
    folds = make_folds(cache, HEADS, FAST, CVConfig(4))
    pool = np.sort(np.concatenate([cache.rows("train"), cache.rows("dev")]))
    assert np.array_equal(folds.pool, pool)
    held = np.concatenate(folds.held_out)
    assert len(held) == len(pool) and np.array_equal(np.sort(held), pool)  # once each
    fold_of = folds.fold_of(len(cache.ids))
    for s in np.unique(cache.systems):
        assert len(set(fold_of[cache.systems == s])) == 1  # a system in one fold only
    direct = [np.sort(pool[t]) for _, t in GroupKFold(4).split(pool, groups=cache.systems[pool])]
    assert all(np.array_equal(a, b) for a, b in zip(folds.held_out, direct))
    assert [sorted(set(cache.systems[h])) for h in folds.held_out] == folds.groups


def test_no_fold_trains_or_stops_on_its_held_out_clips(cache_path):
    """Each fold's own clips are its eval split and nothing else: not in its training
    clips, not in its validation (a holdout of its training clips)."""
    cache = read_cache(cache_path)
    folds = make_folds(cache, HEADS, FAST, CVConfig(3))
    cfg = replace(FAST, eval_split=HELD_OUT)
    for f, held in enumerate(folds.held_out):
        split = make_split(fold_view(cache, folds, f), HEADS, cfg)
        assert np.array_equal(split.eval, held)
        assert not np.intersect1d(split.val, held).size
        assert not np.intersect1d(split.train, held).size
        assert np.array_equal(np.sort(np.concatenate([split.train, split.val])),
                              folds.train_rows(f))
    with pytest.raises(QamroError, match="--val-split dev: that split is cross-validated"):
        make_folds(cache, HEADS, replace(FAST, val_split="dev"), CVConfig(3))


def musiceval_named_cache(path, with_text_only=(), without_prompt=()):
    """Clip ids as MusicEval names its wav files (`audiomos2025-track1-S002_P044`, the
    layout qamro_pipe/extract/datasets/musiceval.py reads from the AudioMOS 2025 track 1
    release, NKU-HLT/MusicEval-baseline), 6 systems x 8 prompts, each prompt with its text."""
    ids, systems, texts = [], [], []
    for s in range(6):
        for p in range(8):
            name = f"audiomos2025-track1-S{s:03d}_P{p + 40:03d}"
            ids.append(name)
            systems.append(f"S{s:03d}")
            texts.append(f"prompt number {p}")
    for i in with_text_only:
        ids[i] = f"extra-{i}"
    for i in without_prompt:
        ids[i], texts[i] = f"bare-{i}", ""
    n = len(ids)
    rng = np.random.default_rng(0)
    return write_cache(path, ids=ids, systems=systems, splits=["train"] * n,
                       labels=rng.uniform(1, 5, (n, 2)).astype(np.float32),
                       label_names=["overall", "textual"], texts=texts,
                       features={"audio": rng.normal(size=(n, 4)).astype(np.float32),
                                 "text": rng.normal(size=(n, 4)).astype(np.float32)},
                       backbone="synthetic@1", dataset="musiceval")


def test_prompt_groups_come_from_musiceval_ids_else_texts(tmp_path):
    cache = read_cache(musiceval_named_cache(tmp_path / "m.h5", with_text_only=(3,)))
    folds = make_folds(cache, HEADS, replace(FAST, eval_split="train"), CVConfig(4, "prompt"))
    fold_of = folds.fold_of(len(cache.ids))
    prompt_of = [i.rsplit("_", 1)[1] if "_P" in i else None for i in cache.ids]
    for p in {x for x in prompt_of if x}:
        assert len({fold_of[i] for i, x in enumerate(prompt_of) if x == p}) == 1
    # a clip without _P<n> goes by its text: "prompt number 3" is P043's, a group of its own
    assert "prompt number 3" in {g for groups in folds.groups for g in groups}
    for f in range(4):  # every system is seen in training: only prompts are new
        assert set(cache.systems[folds.held_out[f]]) <= set(cache.systems[folds.train_rows(f)])
    bare = read_cache(musiceval_named_cache(tmp_path / "b.h5", without_prompt=(5,)))
    with pytest.raises(QamroError, match="1 clip\\(s\\) have no prompt.*'bare-5'"):
        make_folds(bare, HEADS, replace(FAST, eval_split="train"), CVConfig(3, "prompt"))


def test_settings_are_refused_before_any_work(cache_path, tmp_path):
    for args, msg in [(["--cv", "1"], "--cv 1: must be at least 2"),
                      (["--cv", "13"], "hold 12 system(s), and each fold needs one"),
                      (["--cv-group", "prompt"], "--cv-group applies to cross-validation"),
                      (["--cv", "3", "--cv-group", "speaker"], "unknown cv-group 'speaker'"),
                      (["--cv", "3", "--val-split", "dev"], "that split is cross-validated")]:
        out = tmp_path / "never"
        r = CliRunner().invoke(app, ["train", "--cache", str(cache_path), "--out", str(out),
                                     "--quiet", *args])
        assert r.exit_code == 1 and msg in r.output, (args, r.output)
        assert not out.exists() and not list(tmp_path.glob(".never*"))


@pytest.fixture(scope="module")
def cv_run(cache_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cvrun") / "run"
    folder, metrics, result, data = run_experiment(RECIPE, MEMBERS, FAST, cache=cache_path,
                                                   out=out, cv=CVConfig(3))
    return folder, metrics, result, data


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folds_combine_as_mean_over_folds_and_pooled_out_of_fold(cv_run):
    folder, metrics, result, data = cv_run
    folds = make_folds(data, HEADS, FAST, CVConfig(3))
    per_fold = [json.loads((folder / f"fold-{f}" / "metrics.json").read_text())
                for f in range(3)]
    for h in ("overall", "textual"):
        for level in ("system", "utterance"):
            vals = [m["heads"][h][level]["srcc"] for m in per_fold]
            got = metrics["heads"][h][level]
            assert got["srcc"] == pytest.approx(np.mean(vals))
            assert got["srcc_std"] == pytest.approx(np.std(vals, ddof=1))
            assert got["n_folds"] == 3
    rows = read_rows(folder / "predictions.csv")
    assert [r["id"] for r in rows] == list(data.ids[folds.pool])  # every clip once
    fold_of = folds.fold_of(len(data.ids))
    for f in range(3):  # each clip's score is the fold's that held it out
        own = {r["id"]: r for r in read_rows(folder / f"fold-{f}" / "predictions.csv")}
        for r in rows:
            if int(r["fold"]) == f:
                assert own[r["id"]]["split"] == HELD_OUT
                assert r["pred_overall_m1"] == own[r["id"]]["pred_overall_m1"]
    assert all(int(r["fold"]) == fold_of[list(data.ids).index(r["id"])] for r in rows[:20])
    true = np.array([float(r["true_overall"]) for r in rows])
    pred = np.array([float(r["pred_overall"]) for r in rows])
    pooled = evaluate(true, pred, np.array([r["system"] for r in rows]),
                      {s: float(v[0]) for s, v in data.system_mos.items()}, n_boot=0)
    for level in ("system", "utterance"):
        assert metrics["pooled"]["overall"][level]["srcc"] == pytest.approx(
            pooled[level]["srcc"], abs=1e-4)
    on_file = json.loads((folder / "metrics.json").read_text())
    assert on_file["cv"]["folds"] == 3 and on_file["cv"]["group"] == "system"
    assert [f["groups"] for f in on_file["folds"]] == folds.groups
    assert "of each fold's training clips" in on_file["validation"]
    config = json.loads((folder / "fold-1" / "config.json").read_text())
    assert config["cv_fold"]["fold"] == 1 and config["train"]["eval_split"] == HELD_OUT
    assert config["rows"]["eval"] == len(folds.held_out[1])


def test_a_cross_validation_folder_is_not_one_model(cv_run):
    folder = cv_run[0]
    with pytest.raises(QamroError, match="3-fold cross-validation.*fold-0 .. fold-2"):
        load_run(folder)
    r = CliRunner().invoke(app, ["evaluate", str(folder / "fold-0")])
    assert r.exit_code == 1 and "fold 0 of a 3-fold cross-validation" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(folder / "fold-0"), "--split", "dev"])
    assert r.exit_code == 0, r.output  # a fold is a run: any split of the cache can be scored


def test_an_interrupted_cross_validation_resumes_fold_by_fold(cv_run, cache_path, tmp_path,
                                                              monkeypatch):
    """Killed while writing fold 1: nothing of the folder is left, folds 0 and 1 keep their
    states; the rerun resumes them (no epoch trained again), trains fold 2 and ends with the
    numbers of the uninterrupted run; then the states go. A fold's state is never taken for
    another fold's: their fingerprints differ, and a state moved to another fold is refused."""
    import qamro_pipe.experiments.cv as experiment

    out = tmp_path / "run"
    real = experiment.stage_run
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "stage_run", dying)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(RECIPE, MEMBERS, FAST, cache=cache_path, out=out, cv=CVConfig(3))
    monkeypatch.setattr(experiment, "stage_run", real)
    assert not out.exists() and not list(tmp_path.glob(".run.partial-*"))
    states = [partial_dir(fold_out(out, f, 3)) for f in range(3)]
    assert [s.is_dir() for s in states] == [True, True, False]
    # the states of folds 0 and 1 are of two different runs
    data = read_cache(cache_path)
    folds = make_folds(data, HEADS, FAST, CVConfig(3))
    cfg = replace(FAST, eval_split=HELD_OUT)
    prints = {fingerprint(fold_view(data, folds, f), HEADS, MEMBERS, cfg, (1.0, 5.0))
              for f in range(3)}
    assert len(prints) == 3
    shutil.copytree(states[0], states[2])  # fold 0's state where fold 2's would be
    with pytest.raises(QamroError, match="holds the saved state of a different run"):
        run_experiment(RECIPE, MEMBERS, FAST, cache=cache_path, out=out, cv=CVConfig(3))
    shutil.rmtree(states[2])
    folder, metrics, result, _ = run_experiment(RECIPE, MEMBERS, FAST, cache=cache_path,
                                                out=out, cv=CVConfig(3))
    cost = [json.loads((folder / f"fold-{f}" / "config.json").read_text())["cost"]
            for f in range(3)]
    assert [c["resumed_from_epoch"] > 0 for c in cost] == [True, True, False]
    assert all(c["epochs_run"] == c["resumed_from_epoch"] for c in cost[:2])  # none again
    assert not any(s.exists() for s in states)
    whole = cv_run[0]
    assert (folder / "predictions.csv").read_text() == (whole / "predictions.csv").read_text()
    assert metrics["pooled"] == cv_run[1]["pooled"]


def test_train_sweep_and_table_take_cv(cache_path, tmp_path):
    r = CliRunner().invoke(app, ["train", "--cache", str(cache_path), "--cv", "3",
                                 "--max-epochs", "4", "--out", str(tmp_path / "t"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "3-fold cross-validation grouped by system over train + dev, mean ± sd over " \
           "folds" in r.output and "pooled out-of-fold predictions" in r.output
    r = CliRunner().invoke(app, ["sweep", "--cache", str(cache_path), "--cv", "3",
                                 "--beta", "1,7", "--max-epochs", "4",
                                 "--out", str(tmp_path / "s"), "--quiet"])
    assert r.exit_code == 0, r.output
    rows = read_rows(tmp_path / "s" / "sweep.csv")
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    sys_rows = [x for x in rows if x["level"] == "system" and x["head"] == "overall"]
    assert [float(x["srcc"]) for x in sys_rows] == pytest.approx(
        [m["heads"]["overall"]["system"]["srcc"] for m in metrics["members"]])
    r = CliRunner().invoke(app, ["table", "--model", "musiceval", "--cache", str(cache_path),
                                 "--cv", "3", "--seeds", "1", "--max-epochs", "4",
                                 "--out", str(tmp_path / "tab"), "--quiet"])
    assert r.exit_code == 0, r.output
    table = list(csv.reader(open(tmp_path / "tab" / "table.csv")))
    assert table[1][0] == "linear probe (RidgeCV) (n=3)" and table[2][0].endswith("(n=3)")
    assert "3-fold cross-validation grouped by system" in r.output
    # the pooled block: per row, its members' pooled out-of-fold figures; the probe's own
    pooled = list(csv.reader(open(tmp_path / "tab" / "table-pooled.csv")))
    metrics = json.loads((tmp_path / "tab" / "metrics.json").read_text())
    qamro = next(r for r in pooled if r[0].startswith("QAMRO "))
    member = next(m for m in metrics["members"] if m["member"] == "qamro a=0.2 b=7 seed=0")
    col = pooled[0].index("overall SRCC")
    assert float(qamro[col]) == pytest.approx(member["heads"]["overall"]["system"]["srcc"],
                                              abs=5e-4)
    probe = json.loads((tmp_path / "tab" / "probe.json").read_text())
    assert len(probe["fits"]) == 3 and pooled[1][0] == "linear probe (RidgeCV) (n=1)"
    assert float(pooled[1][col]) == pytest.approx(
        probe["pooled"]["overall"]["system"]["srcc"], abs=5e-4)
    assert sum(f["eval_clips"] for f in probe["fits"]) == metrics["cv"]["clips"]


def test_clips_without_a_system_are_groups_of_their_own(tmp_path):
    """A cache shaped as the aes-natural loader fills one (README: its train and dev clips
    have no system, its eval clips do): systems stay whole, each system-less clip is a
    group of its own; with no system at all, grouping by system is refused."""
    rng = np.random.default_rng(1)
    n_train, systems = 40, [f"sys{i}" for i in range(6) for _ in range(5)]
    n = n_train + len(systems)
    path = write_cache(tmp_path / "aes.h5", ids=[f"c{i}" for i in range(n)],
                       systems=[""] * n_train + systems,
                       splits=["train"] * n_train + ["eval"] * len(systems),
                       labels=rng.uniform(1, 10, (n, 2)).astype(np.float32),
                       label_names=["overall", "textual"],
                       features={"audio": rng.normal(size=(n, 4)).astype(np.float32),
                                 "text": rng.normal(size=(n, 4)).astype(np.float32)},
                       backbone="synthetic@1", dataset="aes-like")
    cache = read_cache(path)
    folds = make_folds(cache, HEADS, replace(FAST, eval_split="eval"), CVConfig(4))
    fold_of = folds.fold_of(n)
    for s in set(systems):
        assert len(set(fold_of[cache.systems == s])) == 1
    assert sum(folds.ungrouped) == n_train and sorted(sum(folds.groups, [])) == sorted(
        set(systems))
    assert np.array_equal(np.sort(np.concatenate(folds.held_out)), np.arange(n))
    blank = write_cache(tmp_path / "none.h5", ids=["a", "b", "c"], systems=[""] * 3,
                        splits=["train"] * 3, labels=np.ones((3, 2), np.float32),
                        label_names=["overall", "textual"],
                        features={"audio": np.zeros((3, 2), np.float32),
                                  "text": np.zeros((3, 2), np.float32)},
                        backbone="synthetic@1", dataset="none")
    with pytest.raises(QamroError, match="no clip to cross-validate has a system"):
        make_folds(read_cache(blank), HEADS, replace(FAST, eval_split="train"), CVConfig(2))
