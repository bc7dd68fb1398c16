"""Backbones with random weights built by the libraries' own code: no download, no mocks."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qamro_pipe.errors import QamroError  # noqa: E402
from qamro_pipe.extract.backbones import get_backbone  # noqa: E402
from qamro_pipe.extract.backbones.base import RANDOM_WEIGHTS, sha256_file  # noqa: E402

from kit.backbones import cosine_distance, tone_mix  # noqa: E402


# -- registry -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["melstats", "clap-music", "aesthetics", "muq"])
def test_registry_builds_for_free(name):
    b = get_backbone(name)
    assert b.key == f"{name}@{b.version}" and get_backbone(b.key).key == b.key
    assert not b.loaded and b.feature_specs()
    assert b.window_samples == int(round(b.sample_rate * b.window_seconds))


def test_constructing_backbones_imports_no_model_library():
    code = ("import sys; from qamro_pipe.extract.backbones import get_backbone; "
            "[get_backbone(n).feature_specs() for n in ('clap-music', 'aesthetics', 'melstats', "
            "'muq')]; "
            "print([m for m in ('laion_clap', 'audiobox_aesthetics', 'muq', 'transformers', "
            "'huggingface_hub') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name,filename", [("clap-music", "music_audioset_epoch_15_esc_90.14.pt"),
                                           ("aesthetics", "checkpoint.pt"),
                                           ("muq", "model.safetensors")])
def test_offline_without_checkpoint_is_one_clear_error(tmp_path, monkeypatch, name, filename):
    monkeypatch.setenv("QAMRO_HOME", str(tmp_path))
    with pytest.raises(QamroError, match="--checkpoint PATH") as err:
        get_backbone(name, offline=True).load()
    assert filename in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(QamroError, match="does not exist"):
        get_backbone(name, checkpoint=str(tmp_path / "nope.pt")).load()


def test_checkpoint_identity_is_the_resolved_file_s_sha256(tmp_path, monkeypatch):
    """The cache key names the weights by the sha256 of the file actually loaded: a file
    given with --checkpoint, and a release file found where downloads land, alike; two
    different files never share a key."""
    import torch

    ckpt = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}}, ckpt)
    b = get_backbone("aesthetics", checkpoint=str(ckpt))
    assert b.weights_path() == ckpt
    assert b.identity() == {"weights": f"sha256:{sha256_file(ckpt)}"}
    assert b.provenance()["checkpoint"] == "weights.pt"
    assert b.provenance()["checkpoint_sha256"] == sha256_file(ckpt)
    # no --checkpoint: the release file where a download (or the user) put it, found offline
    monkeypatch.setenv("QAMRO_HOME", str(tmp_path))
    cached = tmp_path / "facebook--audiobox-aesthetics" / "checkpoint.pt"
    cached.parent.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(3)}}, cached)
    released = get_backbone("aesthetics", offline=True)
    assert released.weights_path() == cached
    assert released.identity() == {"weights": f"sha256:{sha256_file(cached)}"}
    assert released.identity() != b.identity()
    assert get_backbone("aesthetics", checkpoint=RANDOM_WEIGHTS).identity() == {
        "weights": RANDOM_WEIGHTS}
    assert get_backbone("melstats").identity() == {"weights": "none"}
    with pytest.raises(QamroError, match="melstats has no weights: --checkpoint .* does not"):
        get_backbone("melstats", checkpoint=str(ckpt)).identity()


# -- melstats ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def melstats_feats():
    from qamro_pipe.extract.backbones.melstats import GLOBAL_STATS

    b = get_backbone("melstats")
    sr = b.sample_rate
    clean = tone_mix(sr, 4.0)
    rng = np.random.default_rng(0)
    spectrum = np.fft.rfft(clean)
    spectrum[np.fft.rfftfreq(len(clean), 1 / sr) > 3000] = 0
    variants = {
        "clean": clean,
        "noisy": clean + 0.05 * rng.standard_normal(len(clean)).astype(np.float32),
        "band_limited": np.fft.irfft(spectrum, len(clean)).astype(np.float32),
        "clipped": np.clip(4 * clean, -1, 1),
        "distorted": (np.tanh(5 * clean) / np.tanh(5.0)).astype(np.float32),
        "quiet": 0.1 * clean,
    }
    feats = b.embed_windows(list(variants.values()))["audio"]
    stats = {k: dict(zip(GLOBAL_STATS, f[-len(GLOBAL_STATS):])) for k, f in zip(variants, feats)}
    return b, variants, dict(zip(variants, feats)), stats


def test_melstats_shape_and_determinism(melstats_feats):
    b, variants, feats, _ = melstats_feats
    assert feats["clean"].shape == b.feature_specs()["audio"].shape == (134,)
    again = get_backbone("melstats").embed_windows([variants["clean"], variants["clean"][:800]])
    np.testing.assert_array_equal(again["audio"][0], feats["clean"])
    assert np.isfinite(again["audio"]).all()
    silence = b.embed_windows([np.zeros(b.window_samples, np.float32)])["audio"]
    assert np.isfinite(silence).all()


@pytest.mark.parametrize("variant", ["noisy", "band_limited", "clipped", "distorted", "quiet"])
def test_melstats_tells_degradations_apart(melstats_feats, variant):
    _, _, feats, _ = melstats_feats
    assert cosine_distance(feats["clean"], feats[variant]) > 0.01
    assert np.abs(feats["clean"] - feats[variant]).max() > 0.3


def test_melstats_statistics_move_the_right_way(melstats_feats):
    *_, s = melstats_feats
    assert s["band_limited"]["hf_ratio"] < 0.01 * s["clean"]["hf_ratio"]
    assert s["band_limited"]["centroid"] < s["clean"]["centroid"]
    assert s["noisy"]["flatness"] > 10 * s["clean"]["flatness"]
    assert s["clean"]["clipped"] == 0 and s["clipped"]["clipped"] > 0.2
    assert s["quiet"]["rms_log10"] == pytest.approx(s["clean"]["rms_log10"] - 1, abs=1e-3)
    assert s["distorted"]["hf_ratio"] > s["clean"]["hf_ratio"]  # harmonics of saturation


def test_melstats_text_is_a_stable_hashed_bag_of_words():
    b = get_backbone("melstats")
    texts = ["A calm piano piece", "a CALM piano piece", "heavy metal with drums", ""]
    t = b.embed_texts(texts)["text"]
    assert t.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(t[:3], axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(t[0], t[1])
    assert not t[3].any() and cosine_distance(t[0], t[2]) > 0.5
    code = ("from qamro_pipe.extract.backbones.melstats import hashed_bag_of_words as h; "
            "print(h('A calm piano piece').tolist())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True).stdout
    np.testing.assert_array_equal(np.array(json.loads(out), np.float32), t[0])


def test_non_finite_features_are_refused():
    x = np.ones(1600, np.float32)
    x[5] = np.nan
    with pytest.raises(QamroError, match="non-finite audio"):
        get_backbone("melstats").embed_windows([x])


def test_pool_is_a_length_weighted_mean():
    b = get_backbone("melstats")
    rows = np.array([[1.0, 2.0], [4.0, 8.0]], np.float32)
    np.testing.assert_allclose(b.pool(rows, np.array([3, 1])), [1.75, 3.5])


# -- aesthetics -------------------------------------------------------------------------------
# the `aes` fixture: tests/conftest.py (kit.backbones.aesthetics_backbone)
def heads_from_layer_features(model, feats):
    """The rest of AesMultiOutput.forward, read off the model's own parameters: per axis,
    softmax layer weights, weighted sum, L2 normalisation, MLP."""
    import torch

    out = {}
    for axis in model.axes_name:
        w = torch.softmax(model.layer_weights[axis], dim=-1)  # [L]
        embed = torch.einsum("blc,l->bc", feats, w)
        out[axis] = model.proj_layer[axis](torch.nn.functional.normalize(embed, dim=-1))[:, 0]
    return out


def test_aesthetics_layers_reproduce_the_original_heads(aes):
    import torch
    from audiobox_aesthetics.infer import make_inference_batch

    from qamro_pipe.extract.audio import windows
    from qamro_pipe.extract.backbones.aesthetics import pad_and_mask

    sr = aes.sample_rate
    rng = np.random.default_rng(2)
    clip = tone_mix(sr, 14.0) + 0.05 * rng.standard_normal(14 * sr).astype(np.float32)
    ours = aes.embed_windows(windows(clip, aes.window_samples))["layers"]  # 10 s + 4 s
    assert ours.shape == (2, 13, 768)
    wavs, masks, weights, _ = make_inference_batch([torch.from_numpy(clip)[None]], 10, 10,
                                                   sample_rate=sr)
    assert weights == [1.0, 0.4]
    wav, mask = pad_and_mask(windows(clip, aes.window_samples), aes.window_samples)
    assert torch.equal(wav, torch.stack(wavs)) and torch.equal(mask, torch.stack(masks))
    with torch.inference_mode():
        expected = aes.model({"wav": torch.stack(wavs), "mask": torch.stack(masks)})
        got = heads_from_layer_features(aes.model, torch.from_numpy(ours))
    for axis in aes.model.axes_name:
        torch.testing.assert_close(got[axis], expected[axis], atol=1e-5, rtol=0)
    assert not np.allclose(ours[0], ours[1], atol=1e-3)


def test_aesthetics_checkpoint_is_read_without_unpickling_code(tmp_path):
    import torch

    from qamro_pipe.extract.backbones.aesthetics import RELEASE_HEAD_CFG, read_aes_checkpoint

    transform = {a: {"mean": 5.0, "std": 1.5} for a in ("CE", "CU", "PC", "PQ")}
    ckpt = {"model_cfg": dict(RELEASE_HEAD_CFG, extra="ignored"), "target_transform": transform,
            "state_dict": {"model.wavlm_model.mask_emb": torch.ones(3)}}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    cfg, tt, state = read_aes_checkpoint(tmp_path / "checkpoint.pt")
    assert cfg["proj_num_layer"] == 5 and tt == transform
    assert list(state) == ["wavlm_model.mask_emb"]
    torch.save(dict(ckpt, extra=np.random.default_rng), tmp_path / "code.pt")
    with pytest.raises(QamroError, match="refused for safety"):
        read_aes_checkpoint(tmp_path / "code.pt")
