"""Heads reading features from several caches of one dataset (`CACHE:FEATURE`), joined by
clip id: MuQ-shaped per-window layers with CLAP-shaped text, clip features with clip
features; through the CLI (train, evaluate, predict) and the library."""
import csv
import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from qamro_pipe.errors import QamroError
from qamro_pipe.store import write_cache
from qamro_pipe.store.reader import read_cache
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.joined import join, split_feature

from kit.caches import write_clip_manifest
from kit.cli import invoke

FAST = ["--max-epochs", "60", "--batch-size", "64"]
# the example of docs/recipes.md, "Features from several caches", as is
FUSED = re.search(r"```toml\n(# stages/muq-text.toml.*?)```",
                  (Path(__file__).parents[2] / "docs" / "recipes.md").read_text(), re.S)[1]


def fused_caches(folder, n_systems=12, per_system=16, seed=0, clap_ids=None, clap_dataset=None,
                 clap_weights="sha256:aa"):
    """folder/muq.h5 (per-window [3, 8] layers, 1-2 windows a clip) and folder/clap-music.h5
    (clip audio and text [8]) of one dataset. Overall follows the windows' layer 1; textual
    needs the text's column 0 as well, which the layers do not hold."""
    rng = np.random.default_rng(seed)
    n = n_systems * per_system
    ids = [f"clip{i:04d}" for i in range(n)]
    systems = np.repeat([f"S{i:03d}" for i in range(n_systems)], per_system)
    quality = np.repeat(np.linspace(1.5, 4.5, n_systems), per_system) + 0.2 * rng.normal(size=n)
    match = rng.normal(size=n)
    labels = np.stack([np.clip(quality, 1, 5),
                       np.clip(0.5 * quality + 0.8 * match + 1.5, 1, 5)], 1).astype(np.float32)
    splits = np.where(rng.random(n) < 0.25, "dev", "train")
    counts = rng.integers(1, 3, size=n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    layers = rng.normal(size=(offsets[-1], 3, 8)).astype(np.float32)
    layers[:, 1, 0] = np.repeat(quality - 3, counts) + 0.2 * rng.normal(size=offsets[-1])
    text = rng.normal(size=(n, 8)).astype(np.float32)
    text[:, 0] = match
    common = dict(systems=systems, splits=splits, labels=labels,
                  label_names=["overall", "textual"])
    folder.mkdir(parents=True, exist_ok=True)
    write_cache(folder / "muq.h5", ids=ids, features={}, backbone="muq@1", dataset="musiceval",
                config={"weights": "sha256:muq"}, windows={"layers": layers},
                window_offsets=offsets, window_weight=rng.uniform(0.5, 1, offsets[-1]).astype(
                    np.float32), **common)
    keep = np.arange(n) if clap_ids is None else clap_ids
    order = rng.permutation(keep)  # rows in another order: joined by id, not by position
    write_cache(folder / "clap-music.h5", ids=[ids[i] for i in order],
                systems=systems[order], splits=splits[order], labels=labels[order],
                label_names=["overall", "textual"],
                features={"audio": rng.normal(size=(len(order), 8)).astype(np.float32),
                          "text": text[order]},
                backbone="clap-music@1", dataset=clap_dataset or "musiceval",
                config={"weights": clap_weights})
    recipe = folder / "fused.toml"
    recipe.write_text(FUSED)
    return folder / "muq.h5", folder / "clap-music.h5", recipe


def test_the_shipped_muq_text_recipe_is_the_documented_one(tmp_path):
    """`--recipe muq-text` (README) reads what docs/recipes.md shows: same heads, features,
    backbone and dataset."""
    from qamro_pipe.train.recipes import load_recipe

    (tmp_path / "doc.toml").write_text(FUSED)
    doc, shipped = load_recipe(tmp_path / "doc.toml"), load_recipe("muq-text")
    assert (shipped.heads, shipped.backbone, shipped.dataset) == \
        (doc.heads, doc.backbone, doc.dataset)
    assert shipped.heads[1].features == ("layers", "clap-music:text")


def test_a_fused_recipe_trains_evaluates_and_records_its_caches(tmp_path):
    muq, clap, recipe = fused_caches(tmp_path / "musiceval")
    out = tmp_path / "run"
    r = invoke("train", "--recipe", recipe, "--cache", muq, "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    (src,) = config["feature_caches"]
    assert src["name"] == "clap-music" and src["path"] == str(clap)  # beside --cache
    assert src["backbone"] == "clap-music@1" and src["key"] == {"weights": "sha256:aa"}
    assert src["features"] == ["text"] and len(src["rows"]) == 64 and config["cache_rows"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heads"]["overall"]["system"]["srcc"] > 0.8
    # textual reads [layers ; text] per window: 8 + 8 inputs after the layer weighting
    from safetensors.torch import load_file

    heads = load_file(str(out / "heads.safetensors"))
    assert heads["textual/m0/0.weight"].shape == (256, 16)
    assert heads["textual/m0/layer_weights"].shape == (3,)
    assert metrics["heads"]["textual"]["utterance"]["lcc"] > 0.5  # the text reached it
    r = invoke("evaluate", out)
    assert r.exit_code == 0, r.output
    ev = json.loads(next(out.glob("evaluations/*/metrics.json")).read_text())
    assert ev["feature_caches"] == {"clap-music": str(clap)}
    for head in ("overall", "textual"):
        assert ev["heads"][head]["utterance"]["srcc"] == pytest.approx(
            metrics["heads"][head]["utterance"]["srcc"], abs=1e-6)
    # the text cache remade with other weights: evaluate refuses it, naming the file
    fused_caches(tmp_path / "musiceval", clap_weights="sha256:bb")
    r = invoke("evaluate", out)
    assert r.exit_code == 1 and str(clap) in r.output
    assert "weights: cache 'sha256:bb', run 'sha256:aa'" in r.output


def test_without_the_other_cache_a_clip_set_mismatch_names_the_missing_ids(tmp_path):
    muq, clap, recipe = fused_caches(tmp_path / "m", clap_ids=np.arange(3, 192))
    r = invoke("train", "--recipe", recipe, "--cache", muq, "--out", tmp_path / "run", *FAST)
    assert r.exit_code == 1 and not (tmp_path / "run").exists()
    assert "3 clips of" in r.output and "clip0000, clip0001, clip0002" in r.output
    assert str(clap) in r.output
    clap.unlink()
    r = invoke("train", "--recipe", recipe, "--cache", muq, "--out", tmp_path / "run", *FAST)
    assert r.exit_code == 1 and f"{clap}: no such cache file" in r.output


@pytest.mark.parametrize("change,msg", [
    ("dataset", "a cache of dataset 'other'"),
    ("feature", "reads clap-music:lyrics, which this cache lacks"),
    ("windows", "must come from caches with the same windows"),
    ("two windows", "reads 2 per-window features"),
])
def test_what_cannot_be_joined_is_refused_before_training(tmp_path, change, msg):
    muq, clap, recipe = fused_caches(tmp_path / "m", clap_dataset="other"
                                     if change == "dataset" else None)
    text = FUSED
    if change == "feature":
        text = FUSED.replace("clap-music:text", "clap-music:lyrics")
    if change == "windows":
        fused_caches(tmp_path / "o", seed=1)  # its clips have other window counts
        shutil.copy(tmp_path / "o" / "muq.h5", tmp_path / "m" / "muq-b.h5")
        text = FUSED.replace('features = ["layers"]', 'features = ["muq-b:layers"]')
    if change == "two windows":  # the same windows, but two per-window features in one head
        shutil.copy(muq, tmp_path / "m" / "muq-b.h5")
        text = FUSED.replace('"clap-music:text"', '"muq-b:layers"')
    recipe.write_text(text)
    r = invoke("train", "--recipe", recipe, "--cache", muq, "--out", tmp_path / "run", *FAST)
    assert r.exit_code == 1 and msg in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_clip_features_join_by_id_and_a_clip_skipped_anywhere_is_unusable(tmp_path):
    muq, clap, _ = fused_caches(tmp_path / "m")
    with h5py.File(clap, "a") as f:  # --skip-bad's record (cache/README.md: /skipped)
        g = f.create_group("skipped")
        g.create_dataset("ids", data=[b"clip0005"], dtype=h5py.string_dtype())
        g.create_dataset("reasons", data=[b"bad file"], dtype=h5py.string_dtype())
    primary = read_cache(muq)
    heads = (HeadSpec("textual", "textual", ("layers", "clap-music:text"), layer_weights=True),)
    joined, (src,) = join(primary, heads)
    other = read_cache(clap)
    for i in (0, 5, 100):
        j = list(other.ids).index(primary.ids[i])
        np.testing.assert_array_equal(joined.features["clap-music:text"][i],
                                      other.features["text"][j])
    assert primary.usable[5] and not joined.usable[5] and joined.usable.sum() == 191
    assert src.path == str(clap) and src.features == ("text",)
    # the primary's labels, splits and systems
    np.testing.assert_array_equal(joined.labels, primary.labels)
    assert split_feature("clap-music:text") == ("clap-music", "text")
    assert split_feature("audio") == (None, "audio")


def test_a_clip_feature_is_repeated_on_each_window_and_layer(tmp_path):
    """The mixing rule (inputs.head_inputs): [layers ; clip features], the clip's row on each
    of its windows and layers; the window-only head's input is a view of the first columns."""
    import torch

    from qamro_pipe.train.inputs import head_inputs
    from qamro_pipe.train.trainer import _inputs

    muq, clap, _ = fused_caches(tmp_path / "m")
    heads = (HeadSpec("overall", "overall", ("layers",), layer_weights=True),
             HeadSpec("textual", "textual", ("layers", "clap-music:text"), layer_weights=True))
    joined, _ = join(read_cache(muq), heads)
    x = head_inputs(joined, heads[1])
    off = joined.window_offsets
    assert x.shape == (off[-1], 3, 16)
    clip = 7
    for w in range(off[clip], off[clip + 1]):
        np.testing.assert_array_equal(x[w, :, :8], joined.windows["layers"][w])
        for layer in range(3):
            np.testing.assert_array_equal(x[w, layer, 8:],
                                          joined.features["clap-music:text"][clip])
    plan = _inputs(joined, heads, torch.device("cpu"))
    shared = {f: x for f, (x, _, _) in plan.items()}
    assert plan[("layers",)][1] == ("layers", "clap-music:text")  # a view, not a copy
    assert shared[("layers",)].data_ptr() == shared[plan[("layers",)][1]].data_ptr()
    np.testing.assert_array_equal(shared[("layers",)].numpy(), joined.windows["layers"])


def test_the_resume_fingerprint_follows_the_other_caches_rows(tmp_path):
    from qamro_pipe.config import Member, TrainConfig
    from qamro_pipe.train.resume import fingerprint

    muq, clap, _ = fused_caches(tmp_path / "m")
    heads = (HeadSpec("textual", "textual", ("layers", "clap-music:text"), layer_weights=True),)

    def fp():
        joined, sources = join(read_cache(muq), heads)
        return fingerprint(joined, heads, [Member()], TrainConfig(), None, sources)
    before = fp()
    assert fp() == before
    with h5py.File(clap, "a") as f:  # one text value changes; key, ids and labels do not
        f["features/text"][3, 1] += 1.0
    assert fp() != before


@pytest.fixture(scope="module")
def two_melstats_caches(tmp_path_factory):
    """A demo corpus embedded twice with melstats, into demo/melstats.h5 and demo/words.h5:
    the second cache's text features join the first's audio."""
    from qamro_pipe.config import ExtractConfig
    from qamro_pipe.extract.datasets import load_dataset
    from qamro_pipe.extract.loop import extract

    root = tmp_path_factory.mktemp("demo")
    recs = load_dataset("demo", root / "corpus", n_systems=6, n_prompts=6, seconds=2.0)
    cfg = ExtractConfig(backbone="melstats", device="cpu", workers=0)
    for name in ("melstats", "words"):
        extract(recs, cfg, root / "demo" / f"{name}.h5", progress=False)
    recipe = root / "fused.toml"
    recipe.write_text('name = "fused-demo"\ndataset = "demo"\nbackbone = "melstats"\n'
                      '[[heads]]\nname = "overall"\nfeatures = ["audio"]\n'
                      '[[heads]]\nname = "textual"\nfeatures = ["audio", "words:text"]\n')
    run = root / "run"
    r = invoke("train", "--recipe", recipe, "--cache", root / "demo" / "melstats.h5", "--out",
               run, "--max-epochs", "30")
    assert r.exit_code == 0, r.output
    return root, run, recs


def test_predict_embeds_new_audio_with_each_cache_s_backbone(two_melstats_caches, tmp_path):
    """predict remakes every cache the run read for the new files and joins them as the run
    did: scoring the corpus's own files gives the run's predictions."""
    root, run, recs = two_melstats_caches
    dev = [c for c in recs.clips if c.split == "dev"][:4]
    manifest = write_clip_manifest(tmp_path / "m.csv", dev)
    out = tmp_path / "s.csv"
    r = invoke("predict", run, "--manifest", manifest, "--out", out)
    assert r.exit_code == 0, r.output
    got = {row["id"]: row for row in csv.DictReader(open(out))}
    pred = {row["id"]: row for row in csv.DictReader(open(run / "predictions.csv"))}
    for c in dev:
        for head in ("overall", "textual"):
            assert float(got[c.id][head]) == pytest.approx(float(pred[c.id][f"pred_{head}"]),
                                                           abs=1e-4)


def test_a_bare_name_resolves_beside_the_cache_a_path_as_given(tmp_path, monkeypatch):
    from qamro_pipe.train.joined import resolve_ref

    monkeypatch.chdir(tmp_path)
    assert resolve_ref("clap-music", tmp_path / "c" / "musiceval" / "muq.h5") == \
        tmp_path / "c" / "musiceval" / "clap-music.h5"
    assert str(resolve_ref("other/x.h5", "c/muq.h5")) == "other/x.h5"
    assert str(resolve_ref("x.h5", "c/muq.h5")) == "x.h5"
    with pytest.raises(QamroError, match="names no feature"):
        from qamro_pipe.train.recipes import load_recipe

        (tmp_path / "r.toml").write_text(FUSED.replace("clap-music:text", "clap-music:"))
        load_recipe(tmp_path / "r.toml")
