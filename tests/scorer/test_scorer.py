"""qamro_pipe.Scorer against the extraction loop, for every backbone, with random weights.

For each backbone a run is trained on a cache whose key is that backbone's (random weights,
as the backbones' own tests build them); then the same audio files are scored three ways:
the heads on the cache `extract` writes of them (the path a run's numbers come from),
`Scorer.score` on the files and on their samples in memory, and `qamro-pipe predict`. All
agree to 1e-5. Each backbone is built once per session and shared by the extraction, the
scorers and predict (the factory hands out the built one), since building one costs up to a
minute on 2 CPU cores."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from qamro_pipe.cli import app  # noqa: E402
from qamro_pipe.config import ExtractConfig, to_jsonable  # noqa: E402
from qamro_pipe.errors import DataError, QamroError  # noqa: E402
from qamro_pipe.extract.backbones import get_backbone  # noqa: E402
from qamro_pipe.extract.backbones.base import RANDOM_WEIGHTS  # noqa: E402
from qamro_pipe.extract.datasets import Clip, DatasetRecords  # noqa: E402
from qamro_pipe.extract.loop import cache_key, extract  # noqa: E402
from qamro_pipe.report.evaluate import TrainedRun  # noqa: E402
from qamro_pipe.store import write_cache  # noqa: E402
from qamro_pipe.store.reader import read_cache  # noqa: E402

from kit.backbones import tone_mix  # noqa: E402
from kit.caches import write_clip_manifest  # noqa: E402

TOL = 1e-5
# what each backbone's run reads: text heads where the backbone embeds text
HEADS = {
    "melstats": [("overall", ["audio"]), ("textual", ["audio", "text"])],
    "clap-music": [("overall", ["audio"]), ("textual", ["audio", "text"])],
    "aesthetics": [("PQ", ["layers"])],
    "muq": [("overall", ["layers"])],
}
TEXTS = ["calm piano", "loud drums and bass", ""]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# the session's random-weight backbones (tests/conftest.py, kit.backbones), which the
# backbones' own tests use too: a worker builds each once
SESSION_FIXTURE = {"clap-music": "clap", "aesthetics": "aes", "muq": "muq_bb"}


class Backbones:
    """`get(name)`: the session's backbone with random weights, loaded, on the CPU (the
    neural ones from their session fixtures, built on first use); `tokenizer`: the folder
    the session's clap reads."""

    def __init__(self, request):
        self.request = request

    def __call__(self, name):
        if name in SESSION_FIXTURE:
            b = self.request.getfixturevalue(SESSION_FIXTURE[name])
        else:
            b = self.request.getfixturevalue("melstats_bb")
        assert b.device == "cpu" and b.checkpoint == RANDOM_WEIGHTS and b.key.startswith(name)
        return b

    @property
    def tokenizer(self):
        return self("clap-music").tokenizer_dir


@pytest.fixture(scope="session")
def melstats_bb():
    b = get_backbone("melstats", checkpoint=RANDOM_WEIGHTS, device="cpu")
    b.load()
    return b


@pytest.fixture
def one_build(request, monkeypatch):
    """Extraction, Scorer.load and predict get the session's built backbone for random
    weights (the settings every test here uses) instead of building another."""
    import qamro_pipe.extract.loop as loop
    import qamro_pipe.scorer as scorer

    shared = Backbones(request)

    def factory(name, **options):
        if options.get("checkpoint") == RANDOM_WEIGHTS and options.get("device") == "cpu":
            return shared(name)
        return get_backbone(name, **options)
    monkeypatch.setattr(loop, "get_backbone", factory)
    monkeypatch.setattr(scorer, "get_backbone", factory)
    return shared


def write_clips(folder, seconds=(0.5, 0.7, 0.9), long=False):
    """Files at other rates and channel counts than any backbone's: they are resampled and
    downmixed. Under a second each (one window, of its own length: MuQ's forward costs in
    proportion; CLAP and Audiobox pad every window to 10 s, melstats reads the long file)
    and of three lengths. -> [(path, rate, channels)]"""
    folder.mkdir(parents=True, exist_ok=True)
    specs = [("a.wav", 16000, 1), ("b.flac", 44100, 2), ("c.wav", 22050, 1)]
    out = []
    rng = np.random.default_rng(7)
    for (name, sr, ch), s in zip(specs, seconds):
        x = tone_mix(sr, s, seed=0)[:, None] * np.linspace(1, 0.5, ch)[None, :]
        x = (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32)
        sf.write(folder / name, x, sr)
        out.append((folder / name, sr, ch))
    if long:  # two 10 s windows and a bit
        sf.write(folder / "d.wav", tone_mix(16000, 21.0)[:, None], 16000)
        out.append((folder / "d.wav", 16000, 1))
    return out


def train_run(folder, name, backbones):
    """A run trained on a synthetic cache keyed as this backbone's cache of the same
    settings: its heads are untrained-looking but deterministic, and it accepts the
    backbone's features."""
    bb, heads = backbones(name), HEADS[name]
    texts = any("text" in f for _, f in heads)
    cfg = ExtractConfig(backbone=name, checkpoint=RANDOM_WEIGHTS, device="cpu", workers=0,
                        tokenizer_dir=str(backbones.tokenizer) if name == "clap-music" else None)
    records = DatasetRecords(name="scorer-test", label_names=(), clips=[])
    key = cache_key(records, bb, texts)
    rng = np.random.default_rng(0)
    n = 48
    specs = {k: s for k, s in bb.feature_specs().items() if texts or not s.text}
    features = {k: rng.normal(size=(n, *s.shape)).astype(np.float32)
                for k, s in specs.items() if not s.per_window}
    windows = {k: rng.normal(size=(n, *s.shape)).astype(np.float32)
               for k, s in specs.items() if s.per_window}
    labels = np.round(rng.uniform(1, 5, size=(n, len(heads))) * 5) / 5
    cache = folder / f"{name}.h5"
    write_cache(cache, ids=[f"t{i}" for i in range(n)],
                systems=[f"S{i % 6}" for i in range(n)],
                splits=["dev" if i % 4 == 0 else "train" for i in range(n)],
                labels=labels.astype(np.float32), label_names=[h for h, _ in heads],
                features=features, backbone=bb.key, dataset="scorer-test",
                config={**key, "extract": to_jsonable(cfg)},
                texts=[f"prompt {i}" for i in range(n)], windows=windows or None,
                window_offsets=np.arange(n + 1) if windows else None,
                window_weight=np.full(n, 1.0, np.float32) if windows else None)
    recipe = folder / "recipe.toml"
    lines = [f'name = "scorer-{name}"', 'dataset = "scorer-test"', f'backbone = "{name}"']
    for head, feats in heads:
        lines += ["[[heads]]", f'name = "{head}"', f'label = "{head}"',
                  f"features = {json.dumps(feats)}", "hidden = [8]"]
        if windows:
            lines.append("layer_weights = true")
    recipe.write_text("\n".join(lines) + "\n")
    run = folder / "run"
    r = invoke("train", "--recipe", recipe, "--cache", cache, "--out", run, "--seeds", "2",
               "--max-epochs", "3", "--quiet")
    assert r.exit_code == 0, r.output
    return run, texts


def rows_from_cache(run, cache_path, ids):
    """What the run's heads give on a cache extraction wrote: the mean over its members."""
    tr = TrainedRun(run)
    cache = read_cache(cache_path)
    preds = tr.predict(cache)
    where = {str(c): i for i, c in enumerate(cache.ids)}
    return {cid: {h: preds[h][:, where[cid]] for h in preds} for cid in ids}


@pytest.mark.parametrize("name", ["melstats", "clap-music", "aesthetics", "muq"])
def test_score_equals_the_extraction_path_and_predict(name, one_build, tmp_path):
    from qamro_pipe import Scorer

    run, texts = train_run(tmp_path / "train", name, one_build)
    files = write_clips(tmp_path / "audio", long=name == "melstats")
    paths = [p for p, _, _ in files]
    prompts = (TEXTS + ["a long one"])[:len(paths)]
    clips = [Clip(id=p.stem, path=p, system="", split="predict", labels=(), text=t)
             for p, t in zip(paths, prompts)]
    recs = DatasetRecords(name="predict", label_names=(), clips=clips)
    extracted = tmp_path / "extracted.h5"
    extract(recs, ExtractConfig(backbone=name, checkpoint=RANDOM_WEIGHTS, device="cpu",
                                workers=0, tokenizer_dir=str(one_build.tokenizer)
                                if name == "clap-music" else None),
            extracted, progress=False, texts=texts)
    expected = rows_from_cache(run, extracted, [c.id for c in clips])

    scorer = Scorer.load(run, device="cpu")
    assert scorer.heads == [h for h, _ in HEADS[name]] and scorer.members == 2
    by_path = scorer.score([str(p) for p in paths], text=prompts)
    assert [r["id"] for r in by_path] == [c.id for c in clips]
    for row in by_path:
        for h in scorer.heads:
            p = expected[row["id"]][h]
            assert row[h] == pytest.approx(p.mean(), abs=TOL), (name, h)
            assert row[f"{h}_sd"] == pytest.approx(p.std(ddof=1), abs=TOL)
    # the same audio as samples: [channels, samples] at the file's rate, or [samples]
    arrays = []
    for path, sr, ch in files:
        x, got_sr = sf.read(path, dtype="float32", always_2d=True)
        assert got_sr == sr
        arrays.append(x.T if ch > 1 else x[:, 0])
    for (path, sr, _), x, t, want in zip(files, arrays, prompts, by_path):
        got = scorer.score(x, sr=sr, text=t)
        assert got[0]["id"] == "#0"
        for h in scorer.heads:
            assert got[0][h] == pytest.approx(want[h], abs=TOL), (name, path.name, h)
    # qamro-pipe predict on the same files writes the same rows
    manifest = write_clip_manifest(tmp_path / "m.csv", clips)
    out = tmp_path / "scores.jsonl"
    args = ["--tokenizer-dir", one_build.tokenizer] if name == "clap-music" else []
    r = invoke("predict", run, "--manifest", manifest, "--out", out, "--device", "cpu", *args)
    assert r.exit_code == 0, r.output
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["id"] for w in written] == [r["id"] for r in by_path]
    for w, row in zip(written, by_path):
        for k, v in row.items():
            assert w[k] == (v if k == "id" else pytest.approx(v, abs=TOL))


def test_second_call_loads_nothing_and_embed_gives_the_cached_features(one_build, tmp_path):
    """The backbone loads once, at Scorer.load; a call embeds and scores only. `embed` gives
    what extraction writes to the cache for the same files."""
    from qamro_pipe import Scorer

    bb = one_build("melstats")
    run, _ = train_run(tmp_path / "train", "melstats", one_build)
    files = [p for p, _, _ in write_clips(tmp_path / "audio")]
    scorer = Scorer.load(run, device="cpu")
    loads = []
    original = type(bb)._load  # what building and reading the weights runs
    type(bb)._load = lambda self: loads.append(1) or original(self)
    try:
        first = scorer.score(files, text="calm piano")
        second = scorer.score(files, text="calm piano")
    finally:
        type(bb)._load = original
    assert loads == [] and first == second
    feats = scorer.embed(files, text="calm piano")
    clips = [Clip(id=p.stem, path=p, system="", split="predict", labels=(), text="calm piano")
             for p in files]
    extract(DatasetRecords(name="predict", label_names=(), clips=clips),
            ExtractConfig(backbone="melstats", device="cpu", workers=0), tmp_path / "x.h5",
            progress=False, texts=True)
    cache = read_cache(tmp_path / "x.h5")
    for i, row in enumerate(feats):
        assert row["id"] == cache.ids[i]
        np.testing.assert_allclose(row["audio"], cache.features["audio"][i], atol=1e-6)
        np.testing.assert_allclose(row["text"], cache.features["text"][i], atol=1e-6)


def test_bad_inputs_are_one_line_naming_the_clip(one_build, tmp_path):
    from qamro_pipe import Scorer

    run, _ = train_run(tmp_path / "train", "melstats", one_build)
    scorer = Scorer.load(run, device="cpu")
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 10)
    good = write_clips(tmp_path / "audio")[0][0]
    with pytest.raises(DataError, match="broken.wav") as err:
        scorer.score([good, tmp_path / "broken.wav"])
    assert "\n" not in str(err.value)
    with pytest.raises(QamroError, match="needs its sample rate"):
        scorer.score(np.zeros(16000, np.float32))
    with pytest.raises(DataError, match=r"#0: at least|#0: 0\.050 s"):
        scorer.score(np.zeros(800, np.float32), sr=16000)
    with pytest.raises(DataError, match="NaN"):
        scorer.score(np.full(16000, np.nan, np.float32), sr=16000)
    with pytest.raises(QamroError, match="2 prompts for 1 clips"):
        scorer.score(good, text=["a", "b"])
    with pytest.raises(QamroError, match="unknown device 'gpu'"):
        Scorer.load(run, device="gpu")
    with pytest.raises(QamroError, match="no member of this run matches"):
        Scorer.load(run, members="seed=9")
    one = Scorer.load(run, device="cpu", members="seed=1")
    row = one.score(good)[0]
    assert "overall_sd" not in row and np.isfinite(row["overall"])


def test_importing_the_package_imports_no_torch():
    """`import qamro_pipe` stays light; Scorer is there on first use (a fresh process: this
    one has torch already)."""
    code = ("import sys, qamro_pipe; print('torch' in sys.modules); "
            "from qamro_pipe import Scorer; print('torch' in sys.modules, Scorer.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["False", "True", "Scorer"]


def test_the_readme_example_picks_the_best_of_four_candidates(one_build, tmp_path,
                                                              monkeypatch, capsys):
    """README "Use from Python", run as written on a folder of generated clips (four
    candidates for each of two prompts): it prints, per prompt, the candidate with the
    highest overall score."""
    from pathlib import Path

    from qamro_pipe import Scorer

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Use from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    run, _ = train_run(tmp_path / "train", "melstats", one_build)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "musiceval").symlink_to(run)
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "prompts.tsv").write_text("P001\tcalm piano\nP002\tloud drums\n")
    rng = np.random.default_rng(5)
    for p in ("P001", "P002"):
        for k in range(4):
            x = tone_mix(16000, 1.5) + (0.05 * k) * rng.standard_normal(24000)
            sf.write(gen / f"{p}_{k}.wav", x.astype(np.float32), 16000)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    rows = Scorer.load(run, device="cpu").score(
        sorted(gen.glob("*.wav")), text=["calm piano"] * 4 + ["loud drums"] * 4)
    best = {p: max((r for r in rows if r["id"].startswith(p)), key=lambda r: r["overall"])["id"]
            for p in ("P001", "P002")}
    assert printed.strip() == str(best)
