import numpy as np
import pytest
import soundfile as sf
import soxr

from qamro_pipe.errors import DataError
from qamro_pipe.extract.audio import (
    MIN_SECONDS,
    load_audio,
    probe,
    resampled_length,
    window_count,
    windows,
)

from kit.mp3 import lame_mp3, needs_mp3


def tone(sr, seconds, freq=440.0, channels=1):
    """Channel c carries the tone at amplitude 0.1 * (c + 1): the mono mix is known."""
    t = np.arange(int(round(sr * seconds))) / sr
    x = np.sin(2 * np.pi * freq * t)[:, None] * (0.1 * np.arange(1, channels + 1))[None, :]
    return x.astype(np.float32)


def write(path, x, sr, subtype=None):
    sf.write(str(path), x, sr, subtype=subtype)
    return path


@pytest.mark.parametrize("sr,channels,ext,subtype", [
    (8000, 1, "wav", "PCM_16"), (44100, 2, "flac", "PCM_24"), (96000, 6, "wav", "FLOAT"),
    (16000, 2, "wav", "PCM_16"), (48000, 1, "flac", "PCM_16"),
])
def test_decode_downmix_resample(tmp_path, sr, channels, ext, subtype):
    x = tone(sr, 1.3, channels=channels)
    path = write(tmp_path / f"a.{ext}", x, sr, subtype)
    info = probe(path)
    assert (info.sample_rate, info.channels, info.frames) == (sr, channels, len(x))
    y = load_audio(path, 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert len(y) == resampled_length(len(x), sr, 16000)
    expected = x.mean(axis=1)
    if sr != 16000:
        expected = soxr.resample(expected, sr, 16000, quality="HQ")
    np.testing.assert_allclose(y, expected, atol=2e-4)  # PCM quantisation only


def test_resampling_keeps_pitch(tmp_path):
    path = write(tmp_path / "a.wav", tone(44100, 2.0, freq=1000.0), 44100)
    y = load_audio(path, 16000)
    assert len(y) == 32000
    spectrum = np.abs(np.fft.rfft(y))
    assert np.fft.rfftfreq(len(y), 1 / 16000)[spectrum.argmax()] == pytest.approx(1000, abs=1)


@pytest.mark.parametrize("sr_in,sr_out", [(44100, 16000), (8000, 48000), (96000, 48000),
                                          (22050, 16000), (11025, 48000), (48000, 16000)])
def test_resampled_length_is_what_soxr_returns(sr_in, sr_out):
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 7, 441, 1000, 4410, 12345, *rng.integers(1, 400_000, 20)]:
        y = soxr.resample(np.zeros(int(n), np.float32), sr_in, sr_out, quality="HQ")
        assert len(y) == resampled_length(int(n), sr_in, sr_out), (n, sr_in, sr_out)


def test_start_end_reads_only_the_segment(tmp_path):
    sr = 8000
    x = (np.arange(3 * sr) % 1000 / 1000 - 0.5).astype(np.float32)
    path = write(tmp_path / "ramp.wav", x, sr, "FLOAT")
    np.testing.assert_array_equal(load_audio(path, sr, start=0.5, end=1.25), x[4000:10000])
    np.testing.assert_array_equal(load_audio(path, sr, start=2.0), x[16000:])
    np.testing.assert_array_equal(load_audio(path, sr, end=1.0), x[:8000])
    assert len(load_audio(path, 16000, start=0.5, end=1.25)) == 12000


def test_windows_are_deterministic_consecutive_cuts():
    x = np.arange(250, dtype=np.float32)
    w = windows(x, 100)
    assert [len(v) for v in w] == [100, 100, 50]
    np.testing.assert_array_equal(np.concatenate(w), x)
    assert all(np.array_equal(a, b) for a, b in zip(w, windows(x, 100)))
    assert [len(v) for v in windows(x[:200], 100)] == [100, 100]
    assert [len(v) for v in windows(x[:30], 100)] == [30]


@pytest.mark.parametrize("sr_file,sr,seconds,window,start,end", [
    (44100, 16000, 25.0, 10.0, None, None), (8000, 48000, 10.0, 10.0, None, None),
    (96000, 48000, 20.00001, 10.0, None, None), (22050, 16000, 3.0, 10.0, None, None),
    (44100, 16000, 31.0, 10.0, 0.3, 30.31), (11025, 16000, 7.3, 2.5, 1.1, None),
    (16000, 16000, 20.0, 10.0, None, None),
])
def test_window_count_matches_windows(tmp_path, sr_file, sr, seconds, window, start, end):
    path = write(tmp_path / "a.flac", tone(sr_file, seconds, channels=2), sr_file)
    n_windows = len(windows(load_audio(path, sr, start, end), int(round(sr * window))))
    assert window_count(path, sr, window, start, end) == n_windows


def test_silence_is_legal(tmp_path):
    path = write(tmp_path / "silence.wav", np.zeros(16000, np.float32), 16000)
    assert not load_audio(path, 16000).any()


def _peak_hz(y, sr):
    return np.fft.rfftfreq(len(y), 1 / sr)[np.abs(np.fft.rfft(y)).argmax()]


@needs_mp3
@pytest.mark.parametrize("sr,seconds,channels", [(16000, 3.3, 1), (44100, 2.5, 2),
                                                 (22050, 0.5, 1)])
def test_cbr_mp3_without_lame_tag_decodes_what_is_there(tmp_path, sr, seconds, channels):
    """Constant-bit-rate MP3 as `lame -t` writes it (LAME's frames, no LAME tag; built by
    tests/kit/mp3.py), wrapped in ID3v2 and ID3v1 tags as taggers add them. libsndfile can
    only estimate its length (from the file size, tags included), so the frame count in its
    header is wrong: this file used to be refused as "decoded N of the M frames the header
    declares". What decodes is the clip, and the per-window count agrees with it."""
    path = lame_mp3(tmp_path / "cbr.mp3", tone(sr, seconds, 1000.0, channels), sr,
                    lame_tag=False, tags=True)
    estimate = sf.info(str(path)).frames
    info = probe(path)
    assert info.frames < estimate  # the tags were counted as audio
    y = load_audio(path, sr)
    assert len(y) == info.frames  # LAME's delay and padding included: there is no tag to say
    assert info.frames >= int(sr * seconds)
    assert _peak_hz(y, sr) == pytest.approx(1000, abs=2)
    # a window that divides the decoded length exactly: the estimate would count one more
    window = info.frames / 4 / sr
    assert window_count(path, sr, window) == len(windows(y, int(round(sr * window)))) == 4


@needs_mp3
def test_mp3_with_lame_tag_has_its_exact_length_and_a_cut_one_is_refused(tmp_path):
    """MP3 as LAME writes it to a file (libsndfile's LAME writer, LAME tag frame first, see
    tests/kit/mp3.py), CBR and VBR, with ID3 tags: the tag states the exact length, so the
    clip decodes to the samples written, and a file cut short is refused like a cut WAV."""
    x = tone(16000, 2.0)
    for constant in (True, False):
        path = lame_mp3(tmp_path / "tagged.mp3", x, 16000, constant=constant, tags=True)
        assert probe(path).frames == len(x) == len(load_audio(path, 16000))
    data = path.read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match="cut.mp3.*truncated"):
        load_audio(cut, 16000)


@needs_mp3
def test_vbr_mp3_without_lame_tag_is_refused_not_cut(tmp_path):
    """Variable-bit-rate MP3 without the LAME tag (tests/kit/mp3.py): libsndfile estimates
    its length from the first frame's bit rate and stops reading there, far too early; the
    file is refused instead of silently embedding a fraction of it."""
    x = tone(48000, 10.0)
    x[:48000] += np.random.default_rng(0).uniform(-0.5, 0.5, (48000, 1)).astype(np.float32)
    # a noisy first second takes the highest bit rates, the pure tone after it the lowest
    path = lame_mp3(tmp_path / "vbr.mp3", x, 48000, constant=False, lame_tag=False)
    with sf.SoundFile(str(path)) as f:
        assert f.frames < 0.8 * len(x)  # what libsndfile alone would decode
    with pytest.raises(DataError, match="vbr.mp3: variable-bit-rate MP3 without"):
        probe(path)


def _bad_files(tmp_path):
    good = write(tmp_path / "good.wav", tone(16000, 1.0), 16000)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.wav"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:20])
    cut_flac = tmp_path / "cut.flac"
    cut_flac.write_bytes(write(tmp_path / "whole.flac", np.random.default_rng(0).uniform(
        -0.5, 0.5, 16000).astype(np.float32), 16000).read_bytes()[:20000])
    nan = tone(16000, 1.0)
    nan[100] = np.nan
    short = tone(16000, MIN_SECONDS / 2)
    return {
        "empty": (empty, "empty file"), "noise": (noise, "unsupported format"),
        "truncated": (truncated, "corrupt header"), "cut_flac": (cut_flac, "cannot decode"),
        "no_samples": (write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), 16000),
                       "no audio"),
        "nan": (write(tmp_path / "nan.wav", nan, 16000, "FLOAT"), "NaN"),
        "short": (write(tmp_path / "short.flac", short, 16000), "at least"),
        "missing": (tmp_path / "missing.wav", "no such file"),
    }


@pytest.mark.parametrize("case", ["empty", "noise", "truncated", "cut_flac", "no_samples",
                                  "nan", "short", "missing"])
def test_bad_files_raise_data_error_naming_the_file(tmp_path, case):
    path, words = _bad_files(tmp_path)[case]
    with pytest.raises(DataError, match=words) as err:
        load_audio(path, 16000)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("start,end", [(-0.1, None), (0.5, 2.0), (0.8, 0.8), (0.9, 0.3),
                                       (0.98, None)])
def test_segment_outside_the_file(tmp_path, start, end):
    path = write(tmp_path / "one_second.wav", tone(16000, 1.0), 16000)
    with pytest.raises(DataError, match="one_second.wav"):
        load_audio(path, 16000, start=start, end=end)
    if (start, end) != (0.98, None):  # 20 ms is inside the file, only too short to use
        with pytest.raises(DataError, match="outside the file"):
            window_count(path, 16000, 10.0, start=start, end=end)
