"""`melstats`: a weightless stand-in backbone (no download) for demos and tests.

Per 10 s window: mean and std over time of a 64-band log-mel spectrogram, plus six global
signal statistics. Text: a hashed bag of words. Cheap, deterministic, and sensitive to the
degradations MOS tracks react to (noise, band limiting, clipping, level).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from .base import Backbone, FeatureSpec, register_backbone

N_FFT = 1024
HOP = 256
N_MELS = 64
HF_CUTOFF_HZ = 4000.0  # "high frequency" for the energy ratio: above telephone band
CLIP_LEVEL = 0.999  # |x| at or above this counts as clipped
TEXT_DIM = 64
EPS = 1e-10
# the six global statistics, in the order they follow the log-mel means and stds
GLOBAL_STATS = ("rms_log10", "centroid", "flatness", "zcr", "clipped", "hf_ratio")
AUDIO_DIM = 2 * N_MELS + len(GLOBAL_STATS)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters, evenly spaced on the HTK mel scale
    from 0 Hz to Nyquist, each normalised to unit sum so band levels are comparable."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bins_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins_hz - lo) / (mid - lo)
    down = (hi - bins_hz) / (hi - mid)
    fb = np.clip(np.minimum(up, down), 0.0, None)
    # the lowest bands are narrower than one FFT bin: give them their nearest bin
    empty = fb.sum(axis=1) == 0
    fb[empty, np.abs(bins_hz[None, :] - mid[empty]).argmin(axis=1)] = 1.0
    return fb / fb.sum(axis=1, keepdims=True)


def power_spectrogram(x: np.ndarray) -> np.ndarray:
    """[frames, n_fft // 2 + 1] |STFT|^2, Hann window, zero-padded by n_fft // 2 at both ends."""
    x = np.pad(x.astype(np.float64), N_FFT // 2)
    n_frames = 1 + (len(x) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
    frames = x[idx] * np.hanning(N_FFT + 1)[:-1]  # periodic Hann
    return np.abs(np.fft.rfft(frames, axis=1)) ** 2


def window_features(x: np.ndarray, sample_rate: int, fb: np.ndarray) -> np.ndarray:
    """One window's [AUDIO_DIM] vector (see GLOBAL_STATS for the tail)."""
    power = power_spectrogram(x)  # [F, K]
    logmel = np.log10(power @ fb.T + EPS)  # [F, N_MELS]
    freqs = np.linspace(0.0, sample_rate / 2, power.shape[1])
    total = power.sum(axis=1) + EPS  # [F]
    weights = total / total.sum()  # loud frames dominate centroid and flatness
    centroid = float(weights @ ((power @ freqs) / total)) / (sample_rate / 2)
    flat = np.exp(np.log(power + EPS).mean(axis=1)) / (power.mean(axis=1) + EPS)
    x64 = x.astype(np.float64)
    stats = [
        np.log10(np.sqrt(np.mean(x64 ** 2)) + EPS),  # level; /20 of dB
        centroid,  # fraction of Nyquist
        float(weights @ flat),  # 0 for pure tones, ~0.56 for white noise
        float(np.mean(np.signbit(x64[1:]) != np.signbit(x64[:-1]))) if len(x) > 1 else 0.0,
        float(np.mean(np.abs(x64) >= CLIP_LEVEL)),
        float(power[:, freqs >= HF_CUTOFF_HZ].sum() / (power.sum() + EPS)),
    ]
    return np.concatenate([logmel.mean(axis=0), logmel.std(axis=0), stats]).astype(np.float32)


def hashed_bag_of_words(text: str, dim: int = TEXT_DIM) -> np.ndarray:
    """Signed feature hashing of lower-cased word tokens, L2-normalised (zeros for no words).
    sha1, not hash(): Python salts str hashes per process."""
    v = np.zeros(dim, dtype=np.float64)
    for token in re.findall(r"[\w']+", text.lower()):
        digest = hashlib.sha1(token.encode("utf-8")).digest()
        v[int.from_bytes(digest[:4], "little") % dim] += 1.0 if digest[4] & 1 else -1.0
    norm = np.linalg.norm(v)
    return (v / norm if norm > 0 else v).astype(np.float32)


@register_backbone
class MelStats(Backbone):
    name = "melstats"
    version = 1
    sample_rate = 16000
    window_seconds = 10.0
    uses_text = True

    def feature_specs(self) -> dict[str, FeatureSpec]:
        return {"audio": FeatureSpec((AUDIO_DIM,)), "text": FeatureSpec((TEXT_DIM,), text=True)}

    def _load(self) -> None:
        self._fb = mel_filterbank(self.sample_rate, N_FFT, N_MELS)  # [N_MELS, K]

    def _prepare(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        return windows  # numpy on the host: the features are computed before returning

    def _forward(self, windows: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {"audio": np.stack([window_features(w, self.sample_rate, self._fb)
                                   for w in windows])}

    def _embed_texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {"text": np.stack([hashed_bag_of_words(t) for t in texts])}
