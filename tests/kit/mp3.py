"""MP3 files built the way encoders and taggers build them, for the tests.

The audio frames are LAME's own: libsndfile's MP3 writer encodes with libmp3lame (3.100 here),
frame for frame what `lame` writes for the same settings. What varies between the files users
have is the framing around those frames:
- LAME writes a first, silent Xing/Info frame (the "LAME tag") stating the exact length and the
  encoder delay and padding, when it can seek back at the end; libsndfile's writer does;
- without it (`lame -t`, "disable writing LAME Tag" in LAME's usage text; encodes streamed to a
  pipe) the file is the bare frames, and a reader can only estimate the length;
- taggers put an ID3v2 tag in front (ID3v2.3: a COMM comment frame, then zero padding, as
  taggers reserve room for later edits) and an ID3v1 tag (128 bytes, "TAG") at the end.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# libsndfile reads and writes MP3 from 1.1 on (the soundfile wheels bundle 1.2)
MP3_SUPPORT = "MP3" in sf.available_formats()
needs_mp3 = pytest.mark.skipif(not MP3_SUPPORT, reason="this libsndfile has no MP3 support")

# Layer III bit rates (kbit/s) for MPEG-1 and MPEG-2/2.5, ISO 11172-3 / 13818-3
_KBPS = ((0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
         (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160))


def _first_frame_size(data: bytes) -> int:
    h = int.from_bytes(data[:4], "big")
    assert h >> 21 == 0x7FF, "not an MPEG frame"
    version, rate_i, hz_i, pad = (h >> 19) & 3, (h >> 12) & 15, (h >> 10) & 3, (h >> 9) & 1
    hz = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}[version]
    return (144 if version == 3 else 72) * _KBPS[version != 3][rate_i] * 1000 // hz[hz_i] + pad


def id3v2(comment: bytes = b"Processed by SoX", padding: int = 1024) -> bytes:
    body = b"\x00eng\x00" + comment  # text encoding, language, empty description, text
    frame = b"COMM" + len(body).to_bytes(4, "big") + b"\x00\x00" + body
    size = len(frame) + padding  # the tag size is sync-safe: 7 bits per byte
    synchsafe = bytes((size >> s) & 0x7F for s in (21, 14, 7, 0))
    return b"ID3\x03\x00\x00" + synchsafe + frame + b"\x00" * padding


def id3v1(title: bytes = b"clip") -> bytes:
    return b"TAG" + title.ljust(30, b"\x00") + b"\x00" * 94 + b"\xff"  # 128 bytes, genre none


def lame_mp3(path: Path, x: np.ndarray, sr: int, *, constant: bool = True,
             lame_tag: bool = True, tags: bool = False) -> Path:
    """x encoded by LAME at a constant (or variable) bit rate; lame_tag=False drops the LAME
    tag frame; tags=True wraps the frames in an ID3v2 and an ID3v1 tag."""
    path = Path(path)
    sf.write(str(path), x, sr, format="MP3", subtype="MPEG_LAYER_III",
             bitrate_mode="CONSTANT" if constant else "VARIABLE", compression_level=0.5)
    data = path.read_bytes()
    assert data[:3] != b"ID3" and (b"Info" in data[:200] or b"Xing" in data[:200])
    if not lame_tag:
        data = data[_first_frame_size(data):]
    if tags:
        data = id3v2() + data + id3v1()
    path.write_bytes(data)
    return path
