"""Decode, downmix, resample and cut audio into windows (soundfile + soxr).

Every problem with a file is a `DataError` whose message starts with the file's path.
`start` / `end` are in seconds of the source file; windows never overlap and are never
cropped at random, so the same file always gives the same windows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import DataError

MIN_SECONDS = 0.1  # shorter segments carry too little signal for any backbone
RESAMPLE_QUALITY = "HQ"  # soxr quality; part of what produces the numbers


@dataclass(frozen=True)
class AudioInfo:
    frames: int  # samples per channel, as the header declares
    sample_rate: int
    channels: int
    duration: float  # seconds


def probe(path: str | Path) -> AudioInfo:
    """Header facts of an audio file, without decoding it."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    if Path(path).stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile raises several types for unreadable files
        raise DataError(f"{path}: cannot decode: unsupported format or corrupt header "
                        f"({_reason(e)})") from e
    if info.samplerate <= 0 or info.channels <= 0:
        raise DataError(f"{path}: invalid header (sample rate {info.samplerate}, "
                        f"{info.channels} channels)")
    return AudioInfo(frames=int(info.frames), sample_rate=int(info.samplerate),
                     channels=int(info.channels), duration=info.frames / info.samplerate)


def resampled_length(n: int, sr_in: int, sr_out: int) -> int:
    """Length soxr.resample returns for n input samples: n * sr_out / sr_in rounded half up
    (checked against soxr in tests/test_audio.py)."""
    if sr_in == sr_out:
        return n
    return (2 * n * sr_out + sr_in) // (2 * sr_in)


def load_audio(path: str | Path, sample_rate: int, start: float | None = None,
               end: float | None = None) -> np.ndarray:
    """Mono float32 samples at `sample_rate` of [start, end) seconds (whole file if None)."""
    info = probe(path)
    first, stop = _segment(path, info, start, end)
    try:
        x = sf.read(str(path), start=first, stop=stop, dtype="float32", always_2d=True)[0]
    except Exception as e:
        raise DataError(f"{path}: cannot decode audio ({_reason(e)})") from e
    if x.shape[0] != stop - first:  # window_count trusts the header: they must agree
        raise DataError(f"{path}: decoded {x.shape[0]} of the {stop - first} frames the "
                        f"header declares (truncated or corrupt file)")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: contains NaN or infinite samples")
    if x.shape[0] < MIN_SECONDS * info.sample_rate:
        raise DataError(f"{path}: {x.shape[0] / info.sample_rate:.3f} s of audio decoded; "
                        f"at least {MIN_SECONDS} s is needed")
    x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if info.sample_rate != sample_rate:
        x = soxr.resample(x, info.sample_rate, sample_rate, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(x, dtype=np.float32)


def windows(x: np.ndarray, window_samples: int) -> list[np.ndarray]:
    """Consecutive, non-overlapping windows; the last one is shorter when the clip does not
    divide evenly, and a clip shorter than one window is one window."""
    if window_samples <= 0:
        raise ValueError(f"window_samples must be positive, got {window_samples}")
    return [x[i:i + window_samples] for i in range(0, max(len(x), 1), window_samples)]


def window_count(path: str | Path, sample_rate: int, window_seconds: float,
                 start: float | None = None, end: float | None = None) -> int:
    """len(windows(load_audio(...), ...)) from the header alone (exact when the header's
    frame count is honest, as it is for WAV and FLAC)."""
    info = probe(path)
    first, stop = _segment(path, info, start, end)
    n = resampled_length(stop - first, info.sample_rate, sample_rate)
    window_samples = int(round(sample_rate * window_seconds))  # as Backbone.window_samples
    return max(1, math.ceil(n / window_samples))


def _segment(path, info: AudioInfo, start: float | None, end: float | None) -> tuple[int, int]:
    """[first, stop) frame indices of the requested segment, checked against the file."""
    if info.frames == 0:
        raise DataError(f"{path}: the file holds no audio (0 samples)")
    first = 0 if start is None else int(round(start * info.sample_rate))
    stop = info.frames if end is None else int(round(end * info.sample_rate))
    if first < 0 or stop > info.frames or first >= stop:
        raise DataError(f"{path}: segment start={start} end={end} s is outside the file "
                        f"(0 to {info.duration:.3f} s) or empty")
    return first, stop


def _reason(e: Exception) -> str:
    return str(e).strip() or type(e).__name__
