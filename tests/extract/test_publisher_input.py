"""Issue 19 A2: each backbone's input is its publisher's own file loading, checked by running
that code on the same files (random weights, generated audio; no download).

- Audiobox-Aesthetics: `audiobox_aesthetics.infer.AesPredictor.forward` on a file path
  (facebookresearch/audiobox-aesthetics src/audiobox_aesthetics/infer.py: `read_wav`
  decodes with torchaudio.load and averages the channels, `audio_resample_mono` resamples
  with torchaudio.functional.resample, `make_inference_batch` cuts 10 s windows, the
  per-axis scores are de-standardised and weight-averaged), with a checkpoint built as the
  publisher builds it (release_fixtures.py). torchaudio 2.9+ decodes through torchcodec,
  which is not installed here; for these PCM WAV files `torchaudio.load` is given what it
  returns for them, the file's samples / 32768 as float32 [channels, time] (soundfile's
  reading), and everything after the decoder is the package's own code.
- LAION-CLAP: `CLAP_Module.get_audio_embedding_from_filelist` (LAION-AI/CLAP
  src/laion_clap/hook.py: librosa.load(f, sr=48000), int16 round trip, repeat-padding).
- MuQ: the package README's `librosa.load(path, sr=24000)` then `muq(wavs,
  output_hidden_states=True)` (tencent-ailab/MuQ README)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

from qamro_pipe.config import ExtractConfig  # noqa: E402
from qamro_pipe.extract import audio  # noqa: E402
from qamro_pipe.extract.backbones import get_backbone  # noqa: E402
from qamro_pipe.extract.datasets import load_dataset  # noqa: E402
from qamro_pipe.extract.loop import extract  # noqa: E402
from qamro_pipe.store.reader import read_cache  # noqa: E402
from qamro_pipe.train.aes_release import clip_scores, read_release, release_heads  # noqa: E402

from kit.release import AXES  # noqa: E402

RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


def music(sr: int, seconds: float, channels: int, seed: int = 0) -> np.ndarray:
    """Tones up to 7 kHz with noise, channels apart: [T, C] float32 in [-1, 1)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(sr * seconds))) / sr
    out = []
    for c in range(channels):
        x = sum(a * np.sin(2 * np.pi * f * (1 + 0.01 * c) * t + p) for a, f, p in
                [(0.2, 220, 0.0), (0.12, 660, 1.0), (0.08, 1500, 2.0), (0.05, 3500, 0.5),
                 (0.04, 7000, 1.5)])
        out.append(x * (1 + 0.2 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(len(t)))
    return np.stack(out, 1).astype(np.float32)


@pytest.mark.parametrize("resampler", sorted(audio.RESAMPLERS))
def test_resampled_length_is_what_each_resampler_returns(resampler):
    rng = np.random.default_rng(0)
    for sr_in in RATES:
        for sr_out in (16000, 24000, 48000):
            for n in [1, 2, 3, 147, 160, 441, 44099, 44100, 44101, 480001,
                      *rng.integers(100, 300_000, 4)]:
                y = audio.resample(np.zeros(int(n), np.float32), sr_in, sr_out, resampler)
                assert len(y) == audio.resampled_length(int(n), sr_in, sr_out, resampler), \
                    (resampler, sr_in, sr_out, n)


def test_librosa_resampler_is_librosa_load_s_and_torchaudio_s_the_package_s(tmp_path):
    """load_audio equals librosa.load (laion_clap's and muq's loading: downmix, soxr HQ,
    librosa's length) sample for sample, and torchaudio.functional.resample after the
    same downmix (AesPredictor's order) on a stereo 44.1 kHz file."""
    import librosa
    import torch
    import torchaudio

    x = music(44100, 2.3, 2)
    path = tmp_path / "a.wav"
    sf.write(path, x, 44100)
    for sr in (48000, 24000, 16000):
        ours = audio.load_audio(path, sr, resampler="librosa")
        theirs, _ = librosa.load(path, sr=sr)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), sr
    read = torch.from_numpy(sf.read(path, dtype="float32", always_2d=True)[0].T.copy())
    want = torchaudio.functional.resample(read.mean(0, keepdim=True), 44100, 16000)[0]
    ours = audio.load_audio(path, 16000, resampler="torchaudio")
    assert ours.shape == tuple(want.shape)
    np.testing.assert_allclose(ours, want.numpy(), rtol=0, atol=1e-7)


# -- Audiobox-Aesthetics: the release heads on the cache against AesPredictor on the file --

@pytest.fixture(scope="module")
def aes_files(publisher_ckpt, tmp_path_factory):
    """A checkpoint built as the publisher builds it (tests/conftest.py's publisher_ckpt);
    files at 16, 44.1 and 48 kHz, mono and stereo (one of 12.5 s: two windows, the second
    short; one of exactly 10 s: one whole window, nothing padded), and a manifest of them."""
    root = tmp_path_factory.mktemp("aes-input")
    ckpt = publisher_ckpt
    files = {}
    for i, (sr, ch, sec) in enumerate([(16000, 1, 10.0), (44100, 2, 12.5), (48000, 2, 4.0),
                                       (44100, 1, 2.7), (48000, 1, 3.3), (16000, 2, 2.1)]):
        p = root / f"c{sr}-{ch}ch.wav"
        sf.write(p, music(sr, sec, ch, seed=i), sr)  # PCM_16, as WAV files usually are
        files[p.stem] = p
    manifest = root / "clips.csv"
    manifest.write_text("id,path\n" + "".join(f"{k},{p}\n" for k, p in files.items()))
    return ckpt, files, manifest


@pytest.fixture(scope="module")
def predictor(aes_files):
    """The package's own AesPredictor on the checkpoint, built once."""
    from audiobox_aesthetics.infer import AesPredictor

    return AesPredictor(checkpoint_pth=str(aes_files[0]), precision="32")


def torchaudio_load_as_torchcodec_would(path, *args, **kwargs):
    """What torchaudio.load returns for a PCM WAV: samples / 32768, float32 [C, T], and the
    rate (see the module docstring: torchcodec, its decoder, is not installed here)."""
    import torch

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), sr


def test_release_heads_on_the_cache_equal_aes_predictor_on_the_file(aes_files, predictor,
                                                                     tmp_path, monkeypatch):
    """The release heads, read from the checkpoint file the cache records (read_release) and
    read off the loaded model (release_heads), on the cache extraction writes, give
    AesPredictor's scores for the same files."""
    import torchaudio

    ckpt, files, manifest = aes_files
    cfg = ExtractConfig(backbone="aesthetics", checkpoint=str(ckpt), device="cpu", workers=0)
    extract(load_dataset("manifest", manifest), cfg, tmp_path / "aes.h5", progress=False)
    cache = read_cache(tmp_path / "aes.h5")
    rel = read_release(cache)
    ours = clip_scores(cache, rel.heads, rel.stats)
    loaded = get_backbone("aesthetics", checkpoint=str(ckpt))
    loaded.load()
    off_the_model = clip_scores(cache, *release_heads(loaded.model))
    monkeypatch.setattr(torchaudio, "load", torchaudio_load_as_torchcodec_would)
    worst = worst_model = 0.0
    for i, clip in enumerate(cache.ids):
        theirs = predictor.forward([{"path": str(files[clip])}])[0]
        for axis in AXES:
            worst = max(worst, abs(ours[axis][i] - theirs[axis]))
            worst_model = max(worst_model, abs(off_the_model[axis][i] - theirs[axis]))
    assert worst < 1e-4, worst
    assert worst_model < 1e-5, worst_model
    assert cache.meta.backbone == "aesthetics@2"  # aesthetics@1 caches were resampled by soxr
    assert cache.meta.key["resampler"] == audio.RESAMPLERS["torchaudio"]


# -- CLAP and MuQ: the cached input is the one their publishers' loading gives ----------------

def test_clap_file_embedding_is_laion_clap_s_from_filelist(clap, tmp_path):
    """A 44.1 kHz stereo file under 10 s whose length librosa rounds up (soxr alone gives a
    sample less): our loading and windowing give get_audio_embedding_from_filelist's input,
    and so its embedding. (`clap`: the session's, tests/conftest.py.)"""
    import torch
    from laion_clap import CLAP_Module

    bb = clap
    n = next(m for m in range(3 * 44100, 3 * 44100 + 50)
             if audio.resampled_length(m, 44100, 48000, "librosa")
             != audio.resampled_length(m, 44100, 48000, "soxr"))
    path = tmp_path / "a.wav"
    sf.write(path, music(44100, n / 44100, 2), 44100)
    x = audio.load_audio(path, bb.sample_rate, resampler=bb.resampler)
    assert len(audio.windows(x, bb.window_samples)) == 1
    ours = bb.embed_windows([x])["audio"][0]
    ref = CLAP_Module.__new__(CLAP_Module)  # its __init__ downloads roberta-base
    torch.nn.Module.__init__(ref)
    ref.enable_fusion, ref.model, ref.model_cfg = False, bb.model, bb.model_cfg
    with torch.no_grad():
        theirs = ref.get_audio_embedding_from_filelist([str(path)])[0]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert bb.key == "clap-music@2"


def test_muq_file_layers_are_the_readme_s_librosa_input(muq_bb, tmp_path):
    """A 44.1 kHz stereo file whose length librosa rounds up: librosa.load(sr=24000) as the
    README, then the package's forward, equals the cached per-layer means of our loading.
    (`muq_bb`: the session's, tests/conftest.py.)"""
    import librosa
    import torch

    bb = muq_bb
    path = tmp_path / "a.wav"
    n = next(m for m in range(52920, 53000)  # about 1.2 s
             if audio.resampled_length(m, 44100, 24000, "librosa")
             != audio.resampled_length(m, 44100, 24000, "soxr"))
    sf.write(path, music(44100, n / 44100, 2), 44100)
    x = audio.load_audio(path, bb.sample_rate, resampler=bb.resampler)
    ours = bb.embed_windows([x])["layers"][0]
    wav, _ = librosa.load(path, sr=24000)
    assert len(x) == len(wav)
    with torch.inference_mode():
        out = bb.model(torch.from_numpy(wav)[None], output_hidden_states=True)
    theirs = np.stack([h[0].mean(0).numpy() for h in out.hidden_states])
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)
    assert bb.key == "muq@2"
