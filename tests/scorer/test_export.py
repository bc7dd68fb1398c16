"""`qamro-pipe export`: a model folder that scores as its run does, offline, from a folder or
from the Hugging Face cache; refusals before any work."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from qamro_pipe.cli import app  # noqa: E402
from qamro_pipe.errors import QamroError  # noqa: E402
from qamro_pipe.store import write_cache  # noqa: E402

from kit.caches import small_demo_run


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A two-seed QAMRO run on the demo corpus's melstats cache."""
    root = tmp_path_factory.mktemp("demo")
    recs, _, run = small_demo_run(root, "--max-epochs", "20", "--seeds", "2", "--quiet")
    return root, run, recs


def clips(folder):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    out = []
    for name, sr, noise in (("x.wav", 16000, 0.01), ("y.flac", 44100, 0.3)):
        t = np.arange(int(1.5 * sr)) / sr
        sf.write(folder / name, (0.4 * np.sin(2 * np.pi * 440 * t) + noise *
                                 rng.standard_normal(len(t))).astype(np.float32), sr)
        out.append(folder / name)
    return out


def test_exported_folder_scores_as_its_run_and_holds_a_card(demo_run, tmp_path):
    from qamro_pipe import Scorer

    root, run, _ = demo_run
    out = tmp_path / "model"
    r = invoke("export", run, out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["qamro_model_version"] == 1 and config["backbone"].startswith("melstats@")
    assert config["labels"] == {"names": ["overall", "textual"], "range": [1.0, 5.0]}
    assert len(config["members"]) == 2 and config["trained_on"]["dataset"] == "demo"
    assert config["backbone_weights"][0]["licence"].startswith("none")
    assert str(root) not in json.dumps(config["cache_config"])  # no paths of this machine
    assert config["metrics"]["heads"]["overall"]["system"]["srcc"] is not None
    card = (out / "README.md").read_text()
    assert "SYNTHETIC" in card and "## Metrics" in card and "| overall | system |" in card
    files = clips(tmp_path / "audio")
    want = Scorer.load(run, device="cpu").score(files, text="calm piano")
    got = Scorer.load(out, device="cpu").score(files, text="calm piano")
    assert [g["id"] for g in got] == ["x", "y"]
    for g, w in zip(got, want):
        for k in ("overall", "overall_sd", "textual", "textual_sd"):
            assert g[k] == pytest.approx(w[k], abs=1e-6)
    # predict reads the folder too
    r = invoke("predict", out, *files, "--text", "calm piano", "--out", tmp_path / "s.jsonl")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rows[1]["textual"] == pytest.approx(want[1]["textual"], abs=1e-6)
    # one member: no spread, its own weights
    one = tmp_path / "one"
    r = invoke("export", run, one, "--members", "seed=1")
    assert r.exit_code == 0, r.output
    single = Scorer.load(one, device="cpu").score(files, text="calm piano")
    alone = Scorer.load(run, device="cpu", members="seed=1").score(files, text="calm piano")
    assert "overall_sd" not in single[0]
    assert single[0]["overall"] == pytest.approx(alone[0]["overall"], abs=1e-6)
    assert "[" in (one / "README.md").read_text().split("## Metrics")[1]  # its intervals


def hub_cache(cache_dir, repo, folder, commit="0123456789abcdef0123456789abcdef01234567",
              ref="main"):
    """A model in the Hugging Face cache as huggingface_hub lays one out (its documented
    cache layout, huggingface_hub/file_download.py): models--OWNER--NAME/blobs/<sha256 of
    each file>, snapshots/<commit>/<file> linking to its blob, refs/<ref> holding the
    commit."""
    base = cache_dir / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, base / "blobs" / digest)
        (snap / f.name).symlink_to(os.path.relpath(base / "blobs" / digest, snap))
    (base / "refs").mkdir()
    (base / "refs" / ref).write_text(commit)
    return commit


def test_an_uploaded_model_loads_offline_from_the_hugging_face_cache(demo_run, tmp_path,
                                                                     monkeypatch):
    from qamro_pipe import Scorer

    root, run, _ = demo_run
    out = tmp_path / "model"
    assert invoke("export", run, out).exit_code == 0
    hub = tmp_path / "hub"
    commit = hub_cache(hub, "someone/demo-qamro", out)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # "someone/demo-qamro" is no folder here
    files = clips(tmp_path / "audio")
    want = Scorer.load(out, device="cpu").score(files)
    for name in ("someone/demo-qamro", f"someone/demo-qamro@{commit}"):
        got = Scorer.load(name, device="cpu").score(files)
        assert got == want
    with pytest.raises(QamroError, match="not in the Hugging Face cache and downloads are "
                                         "off") as err:
        Scorer.load("someone/other-model", device="cpu")
    assert "\n" not in str(err.value)


def test_a_missing_backbone_weights_file_is_one_line_naming_what_to_fetch(tmp_path,
                                                                          monkeypatch):
    """A model trained on Audiobox-Aesthetics features, loaded where the weights are not:
    one line with the release URL (no backbone is built)."""
    from qamro_pipe import Scorer
    from qamro_pipe.extract.audio import RESAMPLERS
    from qamro_pipe.extract.backbones import REGISTRY

    rng = np.random.default_rng(0)
    n = 24
    aes = REGISTRY["aesthetics"]  # the key of a cache this qamro-pipe makes, bar the weights
    key = {"backbone": f"aesthetics@{aes.version}", "weights": "sha256:" + "ab" * 32,
           "sample_rate": 16000, "window_seconds": 10.0, "precision": "fp32",
           "resampler": RESAMPLERS[aes.resampler], "downmix": "mean", "dataset": "mine"}
    config = {**key, "extract": {"backbone": "aesthetics", "checkpoint": "/elsewhere/ckpt.pt"},
              "provenance": {"checkpoint": "checkpoint.pt", "checkpoint_sha256": "ab" * 32,
                             "checkpoint_path": "/elsewhere/ckpt.pt"}}
    cache = write_cache(tmp_path / "aes.h5", ids=[f"c{i}" for i in range(n)],
                        systems=[f"S{i % 4}" for i in range(n)],
                        splits=["dev" if i % 4 == 0 else "train" for i in range(n)],
                        labels=rng.uniform(1, 9, (n, 1)).astype(np.float32),
                        label_names=["PQ"], features={}, backbone=key["backbone"],
                        dataset="mine", config=config,
                        windows={"layers": rng.normal(size=(n, 13, 768)).astype(np.float32)},
                        window_offsets=np.arange(n + 1),
                        window_weight=np.ones(n, np.float32))
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "mine"\ndataset = "mine"\nbackbone = "aesthetics"\n[[heads]]\n'
                      'name = "PQ"\nlabel = "PQ"\nfeatures = ["layers"]\nlayer_weights = true\n'
                      'hidden = [8]\n')
    run = tmp_path / "run"
    r = invoke("train", "--recipe", recipe, "--cache", cache, "--out", run, "--max-epochs", "2",
               "--quiet")
    assert r.exit_code == 0, r.output
    out = tmp_path / "model"
    assert invoke("export", run, out).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    assert "/elsewhere" not in json.dumps(config["cache_config"])  # paths of that machine
    w = config["backbone_weights"][0]
    assert w["file"] == "checkpoint.pt" and w["sha256"] == "ab" * 32
    assert w["fetch"].startswith("https://huggingface.co/facebook/audiobox-aesthetics/")
    assert "CC-BY 4.0" in (out / "README.md").read_text()
    monkeypatch.setenv("QAMRO_HOME", str(tmp_path / "no-weights-here"))
    with pytest.raises(QamroError) as err:
        Scorer.load(out, device="cpu", offline=True)
    msg = str(err.value)
    assert "\n" not in msg and w["fetch"] in msg and "--checkpoint PATH" in msg
    r = invoke("predict", out, tmp_path / "a.wav")
    assert r.exit_code == 1 and w["fetch"] in r.output and "Traceback" not in r.output
    # other weights than those it was trained with: refused before they load, by sha256
    import torch

    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, other)
    with pytest.raises(QamroError, match=r"does not make the features this model was trained "
                                         r"on \(weights: now 'sha256:") as err:
        Scorer.load(out, device="cpu", checkpoint=str(other))
    assert "(checkpoint.pt) as checkpoint=" in str(err.value) and "\n" not in str(err.value)


def test_export_refuses_to_replace_what_it_did_not_write(demo_run, tmp_path):
    root, run, _ = demo_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = invoke("export", run, mine)
    assert r.exit_code == 1 and "did not export" in r.output
    assert (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "model"
    assert invoke("export", run, out).exit_code == 0
    r = invoke("export", run, out)
    assert r.exit_code == 1 and "pass --force" in r.output
    assert invoke("export", run, out, "--force").exit_code == 0
    r = invoke("export", run, tmp_path / "m2", "--members", "seed=5")
    assert r.exit_code == 1 and "no member of this run matches" in r.output
    assert not (tmp_path / "m2").exists()
    r = invoke("export", tmp_path / "nope", tmp_path / "m3")
    assert r.exit_code == 1 and "no such run folder" in r.output
