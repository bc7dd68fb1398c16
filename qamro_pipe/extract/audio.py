"""Decode, downmix, resample and cut audio into windows (soundfile + soxr, or torchaudio
where a backbone's publisher resamples with it).

Every problem with a file is a `DataError` whose message starts with the file's path.
`start` / `end` are in seconds of the source file; windows never overlap and are never
cropped at random, so the same file always gives the same windows.

Lengths: for WAV, FLAC, OGG and the like the header's frame count is exact, and a file that
decodes to fewer frames is refused as truncated. An MP3 states its length only in a Xing/Info
(or VBRI) frame, which LAME writes when it can seek back at the end; without one libsndfile
estimates the length from the file size and the first frame's bit rate, counting ID3 tags as
audio, and stops reading at its estimate. So a tagged MP3 is treated like a WAV; an untagged
constant-bit-rate MP3 is measured by decoding it (what decodes is the clip); and an untagged
variable-bit-rate MP3, whose estimate can be far too short, is refused rather than cut.
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
from ..untrusted import file_kind

MIN_SECONDS = 0.1  # shorter segments carry too little signal for any backbone
RESAMPLE_QUALITY = "HQ"  # soxr quality; part of what produces the numbers
# How each backbone's publisher resamples a file it loads (a backbone names its own, so its
# cache holds what the publisher's inference computes; the label goes into the cache key):
# "soxr": soxr HQ at soxr's length (n * out / in rounded half up);
# "librosa": librosa.load's default (laion_clap's and muq's file loading): soxr HQ, then
#   zero-padded to ceil(n * out / in) by librosa.util.fix_length;
# "torchaudio": torchaudio.functional.resample with its defaults (sinc_interp_hann, width 6,
#   rolloff 0.99), as audiobox_aesthetics' AesPredictor resamples, after downmixing
RESAMPLERS = {"soxr": f"soxr {RESAMPLE_QUALITY}",
              "librosa": f"soxr {RESAMPLE_QUALITY}, librosa length",
              "torchaudio": "torchaudio sinc_interp_hann"}
# A clip (or segment) may hold at most this many frames: it is decoded into one float32 array,
# and a header (a FLAC's STREAMINFO) may claim any length, so the claim is checked first
MAX_FRAMES = 1 << 29
BLOCK_FRAMES = 1 << 20  # decode in blocks, downmixing each: an hour of 6-channel 96 kHz audio
# never sits in memory undownmixed (8 GB); the numbers are the same as reading it whole
# libsndfile's note on a WAV whose data chunk is shorter than its header declares
_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_SIZE_PLACEHOLDERS = (0, 0x7FFFFFFF, 0xFFFFFFFF)  # written by streaming encoders: not a cut
# file name endings libsndfile reads (by content; the ending only shapes the error message)
READABLE_SUFFIXES = frozenset({f".{f.lower()}" for f in sf.available_formats()}
                              | {".aif", ".wave", ".oga", ".opus"})


# MPEG audio Layer III: kbit/s by bit-rate index (MPEG-1; MPEG-2 and 2.5) and Hz by sample-rate
# index (MPEG-1, MPEG-2, MPEG-2.5), from the frame header layout (ISO 11172-3 / 13818-3)
_L3_KBPS = ((0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
            (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160))
_MPEG_HZ = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_LENGTH_TAGS = (b"Xing", b"Info", b"VBRI")  # frames that state an MP3's exact length


@dataclass(frozen=True)
class AudioInfo:
    frames: int  # samples per channel: the header's count (MP3 without a length tag: decoded)
    sample_rate: int
    channels: int
    duration: float  # seconds


def probe(path: str | Path) -> AudioInfo:
    """Header facts of an audio file, without decoding it."""
    kind = file_kind(path)  # a FIFO would block the decoder forever
    if kind:
        raise DataError(f"{path}: {kind}, not an audio file")
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
    frames = int(info.frames)
    if info.format == "MP3":
        frames = _mp3_frames(path, frames)
    return AudioInfo(frames=frames, sample_rate=int(info.samplerate),
                     channels=int(info.channels), duration=frames / info.samplerate)


def _mp3_frames(path, estimate: int) -> int:
    """The frames an MP3 decodes to (see the module docstring)."""
    tagged, bit_rates = _mpeg_scan(Path(path).read_bytes())
    if tagged:
        return estimate  # read from the length tag: exact
    if len(bit_rates) > 1:
        raise DataError(f"{path}: variable-bit-rate MP3 without a Xing/Info header: its length "
                        f"cannot be known and libsndfile would cut it short; re-encode it "
                        f"(e.g. ffmpeg -i IN OUT.flac)")
    n = 0
    try:
        with sf.SoundFile(str(path)) as f:
            while got := len(f.read(BLOCK_FRAMES, dtype="int16", always_2d=True)):
                n += got
    except Exception as e:
        raise DataError(f"{path}: cannot decode audio ({_reason(e)})") from e
    return n


def _mpeg_scan(data: bytes) -> tuple[bool, set[int]]:
    """(whether the first frame is a length tag, the bit rates of the Layer III frames) of an
    MPEG audio stream, walking frame headers from the first one; stops at anything else (an
    ID3v1 tag, junk, a format it does not walk), so the bit rates may be a prefix's."""
    i = 0
    if data[:3] == b"ID3" and len(data) >= 10:  # ID3v2: 10-byte header, sync-safe size
        i = 10 + sum((b & 0x7F) << s for b, s in zip(data[6:10], (21, 14, 7, 0))) \
            + (10 if data[5] & 0x10 else 0)
    rates: set[int] = set()
    first = True
    while i + 4 <= len(data):
        h = int.from_bytes(data[i:i + 4], "big")
        version, layer, rate_i, hz_i = (h >> 19) & 3, (h >> 17) & 3, (h >> 12) & 15, (h >> 10) & 3
        if h >> 21 != 0x7FF or version == 1 or layer != 1 or rate_i in (0, 15) or hz_i == 3:
            break  # not a Layer III frame header with a known size
        kbps = _L3_KBPS[version != 3][rate_i]
        size = (144 if version == 3 else 72) * kbps * 1000 // _MPEG_HZ[version][hz_i] \
            + ((h >> 9) & 1)
        if first and any(t in data[i:i + size] for t in _LENGTH_TAGS):
            return True, set()
        first = False
        rates.add(kbps)
        i += size
    return False, rates


def resampled_length(n: int, sr_in: int, sr_out: int, resampler: str = "soxr") -> int:
    """Length `resample` returns for n input samples (checked against soxr, librosa and
    torchaudio in tests): soxr's is n * sr_out / sr_in rounded half up; librosa's the ceiling
    of n times the float ratio; torchaudio's the ceiling of that quotient in float32 (its
    own arithmetic, kept so that the counts agree to the sample)."""
    if sr_in == sr_out:
        return n
    if resampler == "librosa":
        return int(np.ceil(n * (float(sr_out) / sr_in)))
    if resampler == "torchaudio":
        g = math.gcd(sr_in, sr_out)
        return int(math.ceil(np.float32((sr_out // g) * n / (sr_in // g))))
    return (2 * n * sr_out + sr_in) // (2 * sr_in)


def resample(x: np.ndarray, sr_in: int, sr_out: int, resampler: str = "soxr") -> np.ndarray:
    """Mono float32 samples from sr_in to sr_out the way `resampler` (RESAMPLERS) does."""
    if resampler not in RESAMPLERS:
        raise ValueError(f"unknown resampler {resampler!r}; known: {', '.join(RESAMPLERS)}")
    if sr_in == sr_out:
        return x
    if resampler == "torchaudio":
        import torch  # heavy: only a backbone whose publisher resamples so needs them
        import torchaudio

        with torch.inference_mode():
            y = torchaudio.functional.resample(torch.from_numpy(x)[None], sr_in, sr_out)
        return y[0].numpy()
    y = soxr.resample(x, sr_in, sr_out, quality=RESAMPLE_QUALITY)
    if resampler == "librosa":
        n = resampled_length(len(x), sr_in, sr_out, resampler)
        y = np.pad(y[:n], (0, max(0, n - len(y))))
    return y


def load_audio(path: str | Path, sample_rate: int | None, start: float | None = None,
               end: float | None = None, max_frames: int | None = None,
               resampler: str = "soxr") -> np.ndarray:
    """Mono float32 samples at `sample_rate` of [start, end) seconds (whole file if None):
    channels averaged, then resampled by `resampler` (the order of every publisher's own
    file loading). sample_rate None keeps the file's own rate (no resampling); `max_frames`
    keeps only the first that many frames of the segment, at the file's rate (only those
    are decoded)."""
    info = probe(path)
    first, stop = _segment(path, info, start, end)
    if max_frames is not None:
        stop = min(stop, first + max_frames)
    x = _read_mono(path, first, stop)
    if x.shape[0] < MIN_SECONDS * info.sample_rate:
        raise DataError(f"{path}: {x.shape[0] / info.sample_rate:.3f} s of audio decoded; "
                        f"at least {MIN_SECONDS} s is needed")
    if sample_rate is not None and info.sample_rate != sample_rate:
        x = resample(x, info.sample_rate, sample_rate, resampler)
    return np.ascontiguousarray(x, dtype=np.float32)


def from_samples(x: np.ndarray, sr: int, sample_rate: int | None,
                 max_frames: int | None = None, what: str = "audio",
                 resampler: str = "soxr") -> np.ndarray:
    """What `load_audio` gives for a file holding these samples ([samples], or [channels,
    samples]) at `sr`: float32, channels averaged, the first `max_frames` kept, resampled to
    `sample_rate` by `resampler` (None: kept at `sr`), with the same checks. `what` names the
    clip in errors."""
    x = np.asarray(x)
    if x.ndim not in (1, 2) or x.size == 0:
        raise DataError(f"{what}: audio must be [samples] or [channels, samples] with samples; "
                        f"got shape {list(x.shape)}")
    if not isinstance(sr, (int, np.integer)) or isinstance(sr, bool) or sr <= 0:
        raise DataError(f"{what}: a sample rate (sr=) is needed for audio given as samples, "
                        f"a positive whole number; got {sr!r}")
    x = x.astype(np.float32, copy=False)
    # [frames, channels], averaged as _read_mono averages a decoded block
    frames = x[:, None] if x.ndim == 1 else x.T
    if max_frames is not None:
        frames = frames[:max_frames]
    if not np.isfinite(frames).all():
        raise DataError(f"{what}: contains NaN or infinite samples")
    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    if mono.shape[0] < MIN_SECONDS * sr:
        raise DataError(f"{what}: {mono.shape[0] / sr:.3f} s of audio; at least {MIN_SECONDS} s "
                        f"is needed")
    if sample_rate is not None and sr != sample_rate:
        mono = resample(mono, int(sr), sample_rate, resampler)
    return np.ascontiguousarray(mono, dtype=np.float32)


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
    if got != len(out):  # window_count trusts probe's length: they must agree
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
                 start: float | None = None, end: float | None = None,
                 resampler: str = "soxr") -> int:
    """len(windows(load_audio(...), ...)) from probe's length: the header's where it is exact,
    as for WAV and FLAC; what decodes for an MP3 that does not state its length."""
    info = probe(path)
    first, stop = _segment(path, info, start, end)
    n = resampled_length(stop - first, info.sample_rate, sample_rate, resampler)
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
    if stop - first > MAX_FRAMES:  # decoded whole into memory: what the header says counts
        raise DataError(f"{path}: the header declares {stop - first:,} frames "
                        f"({(stop - first) / info.sample_rate / 3600:,.1f} h at "
                        f"{info.sample_rate} Hz); a clip may hold at most {MAX_FRAMES:,} frames "
                        f"(3.1 h at 48 kHz, 2 GiB as float32): cut it into parts (manifest "
                        f"start/end columns)")
    return first, stop


def _reason(e: Exception) -> str:
    return str(e).strip() or type(e).__name__
