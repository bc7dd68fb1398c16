"""muq against the `muq` package's own model: random weights in MuQ's published architecture,
a checkpoint saved the way the release is made, no download, no mocks.

Sources the fixtures copy: tencent-ailab/MuQ (PyPI muq 0.1.0) src/muq/muq/muq.py, whose MuQ
is a huggingface_hub PyTorchModelHubMixin: `from_pretrained` reads config.json (MuQConfig's
fields) and model.safetensors, which `save_pretrained` writes; its recipe
src/recipes/pretrain (Stat, W2v2Config) for the architecture's settings; the README for
the forward (`muq(wavs, output_hidden_states=True)` on 24 kHz audio)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qamro_pipe.errors import QamroError  # noqa: E402
from qamro_pipe.extract.backbones import get_backbone  # noqa: E402
from qamro_pipe.extract.backbones.base import RANDOM_WEIGHTS, sha256_file  # noqa: E402

from kit.backbones import tone_mix  # noqa: E402

# the `muq_bb` fixture: tests/conftest.py (kit.backbones.muq_backbone)


@pytest.fixture(scope="module")
def saved_release(muq_bb, tmp_path_factory):
    """config.json + model.safetensors as the package's own save_pretrained writes them, with
    the MuQConfig a user of the package builds (no settings of ours in it)."""
    from muq import MuQConfig

    from qamro_pipe.extract.backbones.muq import RANDOM_CONFIG

    folder = tmp_path_factory.mktemp("release")
    muq_bb.model.save_pretrained(folder, config=MuQConfig(**RANDOM_CONFIG))
    assert "_attn_implementation" not in (folder / "config.json").read_text()
    return folder


def package_layers(model, window: np.ndarray) -> np.ndarray:
    """The README's call on one window: MuQ.forward with all hidden states; the time mean of
    each. -> [13, 1024]"""
    import torch

    with torch.inference_mode():
        out = model(torch.from_numpy(window)[None], output_hidden_states=True)
    return np.stack([h[0].mean(0).numpy() for h in out.hidden_states])


def test_cached_layers_are_the_package_s_hidden_state_means(tmp_path, muq_bb):
    """Extraction end to end (decode, resample to 24 kHz, window, embed, write): each cached
    window's layers equal the package's forward on that window; the cache holds [13, 1024]
    per window with its real length."""
    import soundfile as sf

    from qamro_pipe.config import ExtractConfig
    from qamro_pipe.extract import audio
    from qamro_pipe.extract.datasets import load_dataset
    from qamro_pipe.extract.loop import extract
    from qamro_pipe.store.reader import read_cache

    sf.write(tmp_path / "a.wav", tone_mix(16000, 1.5), 16000)  # resampled to 24 kHz
    sf.write(tmp_path / "b.wav", 0.3 * tone_mix(24000, 0.3), 24000)
    (tmp_path / "m.csv").write_text("id,path,system,split,mos\na,a.wav,S1,train,3.0\n"
                                    "b,b.wav,S2,train,4.0\n")
    cfg = ExtractConfig(backbone="muq", checkpoint=RANDOM_WEIGHTS, device="cpu", workers=0)
    extract(load_dataset("manifest", tmp_path / "m.csv"), cfg, tmp_path / "muq.h5",
            progress=False)
    cache = read_cache(tmp_path / "muq.h5")
    assert cache.meta.backbone == "muq@2" and cache.meta.key["weights"] == RANDOM_WEIGHTS
    assert cache.windows["layers"].shape == (2, 13, 1024)
    assert list(cache.window_weight) == [36000, 7200]
    for i, name in enumerate(cache.ids):
        x = audio.load_audio(tmp_path / f"{name}.wav", muq_bb.sample_rate)
        np.testing.assert_allclose(cache.windows["layers"][i],
                                   package_layers(muq_bb.model, x), atol=2e-5, rtol=0)
    assert muq_bb.rng_kept


def test_windows_of_one_call_run_at_their_own_length(muq_bb):
    """A clip cut into windows (full ones and a shorter last one) in one call: each row is
    the package's forward on that window alone, whatever else shares the call; a window
    shorter than MuQ can embed (a clip's last few samples) is zero-padded to that minimum."""
    from qamro_pipe.extract import audio
    from qamro_pipe.extract.backbones.muq import MIN_WINDOW_SAMPLES

    sr = muq_bb.sample_rate
    clip = tone_mix(sr, 2.4) + 0.02 * np.random.default_rng(0).standard_normal(
        int(2.4 * sr)).astype(np.float32)
    wins = audio.windows(clip, sr)  # 1 s windows here, for speed (the backbone's are 30 s)
    assert [len(w) for w in wins] == [sr, sr, int(0.4 * sr)]
    tail = wins[2][:500]
    padded = np.concatenate([tail, np.zeros(MIN_WINDOW_SAMPLES - 500, np.float32)])
    got = muq_bb.embed_windows([*wins, tail])["layers"]
    assert got.shape == (4, 13, 1024)
    for row, w in zip(got, [*wins, padded]):
        np.testing.assert_allclose(row, package_layers(muq_bb.model, w), atol=2e-5, rtol=0)
    assert not np.allclose(got[0], got[1], atol=1e-3)  # the audio reaches every layer
    assert np.abs(got[0, 12] - got[0, 1]).max() > 1e-2  # layers differ


def test_a_checkpoint_saved_as_the_release_loads_every_weight(saved_release, muq_bb):
    import torch

    b = get_backbone("muq", checkpoint=str(saved_release / "model.safetensors"))
    assert b.identity() == {
        "weights": f"sha256:{sha256_file(saved_release / 'model.safetensors')}",
        "companions": {"config.json": f"sha256:{sha256_file(saved_release / 'config.json')}"}}
    b.load()
    theirs = muq_bb.model.state_dict()
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    w = tone_mix(b.sample_rate, 0.5)
    np.testing.assert_array_equal(b.embed_windows([w])["layers"],
                                  muq_bb.embed_windows([w])["layers"])


def test_weights_missing_what_the_encoder_reads_are_refused(muq_bb):
    from qamro_pipe.extract.backbones.muq import load_muq_weights

    state = dict(muq_bb.model.state_dict())
    key = next(k for k in state if k.startswith("model.conformer.layers.3."))
    del state[key]
    with pytest.raises(QamroError, match=f"do not fit MuQ: missing.*{key}"):
        load_muq_weights(muq_bb.model, state, "w.safetensors")


def test_offline_without_weights_names_both_files(tmp_path, monkeypatch):
    monkeypatch.setenv("QAMRO_HOME", str(tmp_path))
    with pytest.raises(QamroError, match="downloads are off") as err:
        get_backbone("muq", offline=True).load()
    msg = str(err.value)
    for part in ("model.safetensors", "config.json", "--checkpoint PATH", str(tmp_path),
                 "OpenMuQ/MuQ-large-msd-iter/resolve/"):
        assert part in msg
    # the weights where a download lands, but not their config: still one clear error
    folder = tmp_path / "OpenMuQ--MuQ-large-msd-iter"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(QamroError, match="config.json"):
        get_backbone("muq", offline=True).load()


@pytest.mark.parametrize("weights,config,msg", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1316204272\n", "{}",
     "Git LFS pointer"),
    (b"<html>Too many requests</html>", "{}", r"not a safetensors file \(text"),
    (b"", "{}", "empty file"),
    (None, "{\"encoder_dim\": 1024}", "not a MuQ config.json"),
    (None, "not json", "not a readable JSON config"),
    (None, None, "needs config.json beside it"),
])
def test_wrong_files_are_refused_before_anything_is_built(tmp_path, saved_release, weights,
                                                          config, msg):
    path = tmp_path / "model.safetensors"
    if weights is None:
        path.symlink_to(saved_release / "model.safetensors")
    else:
        path.write_bytes(weights)
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    with pytest.raises(QamroError, match=msg):
        get_backbone("muq", checkpoint=str(path)).load()


T4 = os.environ.get("QAMRO_TRANSFORMERS4")  # a folder with transformers 4 (and a hub < 1)


@pytest.mark.skipif(not T4, reason="set QAMRO_TRANSFORMERS4 to a transformers-4 site folder")
def test_transformers_5_gives_the_hidden_states_transformers_4_gave(saved_release, muq_bb,
                                                                   tmp_path):
    """muq 0.1.0 was written against transformers 4: there, unchanged, it gives the hidden
    states our build gets from transformers 5 (checked with 4.46.3: the same bits)."""
    w = tone_mix(muq_bb.sample_rate, 1.0)
    np.save(tmp_path / "w.npy", w)
    code = ("import sys, numpy as np, transformers; assert transformers.__version__[0] == '4';"
            "from qamro_pipe.extract.backbones import get_backbone;"
            f"b = get_backbone('muq', checkpoint={str(saved_release / 'model.safetensors')!r});"
            f"np.save({str(tmp_path / 'out.npy')!r}, "
            f"b.embed_windows([np.load({str(tmp_path / 'w.npy')!r})])['layers'])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([T4, *sys.path]))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"),
                                  muq_bb.embed_windows([w])["layers"])


def test_recipe_from_a_muq_cache_learns_layer_weights(tmp_path):
    """A muq cache of a user's manifest trains without a recipe: its head is the per-layer
    head (softmax layer weights), as for Audiobox-Aesthetics layers."""
    from qamro_pipe.store import write_cache
    from qamro_pipe.store.reader import read_cache
    from qamro_pipe.train.recipes import recipe_from_cache

    rng = np.random.default_rng(0)
    write_cache(tmp_path / "muq.h5", ids=["a", "b"], systems=["S1", "S2"],
                splits=["train", "dev"], labels=np.array([[3.0], [4.0]], np.float32),
                label_names=["mos"], features={}, backbone="muq@1", dataset="mine",
                config={}, windows={"layers": rng.normal(size=(3, 13, 1024)).astype(np.float32)},
                window_offsets=np.array([0, 2, 3]), window_weight=np.ones(3, np.float32))
    r = recipe_from_cache(read_cache(tmp_path / "muq.h5"))
    assert [(h.features, h.layer_weights) for h in r.heads] == [(("layers",), True)]
    assert json.loads(json.dumps(r.derived)).startswith("no recipe for dataset 'mine'")


def test_the_window_is_muq_s_training_crop():
    b = get_backbone("muq")
    assert (b.sample_rate, b.window_seconds, b.window_samples) == (24000, 30.0, 720000)
    assert Path(b.release.local_path).parent.name == "OpenMuQ--MuQ-large-msd-iter"
