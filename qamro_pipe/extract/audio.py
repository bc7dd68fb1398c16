"""Decode, downmix, resample and cut audio into windows (soundfile + soxr).

Every problem with a file is a `DataError` whose message starts with the file's path.
`start` / `end` are in seconds of the source file; windows never overlap and are never
cropped at random, so the same file always gives the same windows.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ..errors import DataError

MIN_SECONDS = 0.1  # shorter segments carry too little signal for any backbone
RESAMPLE_QUALITY = "HQ"  # soxr quality; part of what produces the numbers
BLOCK_FRAMES = 1 << 20  # decode in blocks, downmixing each: an hour of 6-channel 96 kHz audio
# never sits in memory undownmixed (8 GB); the numbers are the same as reading it whole
# libsndfile's note on a WAV whose data chunk is shorter than its header declares
_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_SIZE_PLACEHOLDERS = (0, 0x7FFFFFFF, 0xFFFFFFFF)  # written by streaming encoders: not a cut
# file name endings libsndfile reads (by content; the ending only shapes the error message)
READABLE_SUFFIXES = frozenset({f".{f.lower()}" for f in sf.available_formats()}
                              | {".aif", ".wave", ".oga", ".opus"})


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
        suffix = Path(path).suffix.lower()
        if suffix not in READABLE_SUFFIXES:
            raise DataError(f"{path}: cannot decode: unsupported file type {suffix or '(none)'!r}"
                            f" (readable: .wav, .flac, .ogg, .mp3, .aiff and other libsndfile "
                            f"formats; convert it, e.g. ffmpeg -i IN OUT.wav)") from e
        raise DataError(f"{path}: cannot decode: unsupported format or corrupt header "
                        f"({_reason(e)})") from e
    if info.samplerate <= 0 or info.channels <= 0:
        raise DataError(f"{path}: invalid header (sample rate {info.samplerate}, "
                        f"{info.channels} channels)")
    short = _SHORT_DATA.search(info.extra_info or "")
    if short and int(short[1]) not in _SIZE_PLACEHOLDERS and int(short[2]) < int(short[1]):
        # libsndfile would quietly decode what is there: a clip cut off mid-write would be
        # embedded as if it were whole
        raise DataError(f"{path}: truncated: the header declares {short[1]} bytes of audio, "
                        f"the file holds {short[2]} (cut off while being written?)")
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
    x = _read_mono(path, first, stop)
    if x.shape[0] < MIN_SECONDS * info.sample_rate:
        raise DataError(f"{path}: {x.shape[0] / info.sample_rate:.3f} s of audio decoded; "
                        f"at least {MIN_SECONDS} s is needed")
    if info.sample_rate != sample_rate:
        x = soxr.resample(x, info.sample_rate, sample_rate, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(x, dtype=np.float32)


def _read_mono(path, first: int, stop: int) -> np.ndarray:
    """Frames [first, stop) as float32, channels averaged block by block."""
    out = np.empty(stop - first, dtype=np.float32)
    got = 0
    try:
        with sf.SoundFile(str(path)) as f:
            if first:
                f.seek(first)
            while got < len(out):
                block = f.read(min(BLOCK_FRAMES, len(out) - got), dtype="float32",
                               always_2d=True)
                if len(block) == 0:
                    break
                if not np.isfinite(block).all():
                    raise DataError(f"{path}: contains NaN or infinite samples")
                out[got:got + len(block)] = (block.mean(axis=1, dtype=np.float32)
                                             if block.shape[1] > 1 else block[:, 0])
                got += len(block)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot decode audio ({_reason(e)})") from e
    if got != len(out):  # window_count trusts the header: they must agree
        raise DataError(f"{path}: decoded {got} of the {len(out)} frames the header declares "
                        f"(truncated or corrupt file)")
    return out


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
