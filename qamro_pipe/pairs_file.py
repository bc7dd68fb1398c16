"""Pairs files: a prompt and two generated clips per item, and, where labelled, which one
people preferred. Read here, once, for everything that reads them: `prefer`, `evaluate
--pairs` (pairs.py) and training's Bradley-Terry term (train/pairs_term.py). Light (json,
pathlib): the CLI checks a pairs file with it before torch is imported.

A pairs file is JSON lines (or one JSON list). Each item has an id, a prompt and two audio
paths, relative to the pairs file (or absolute); labelled items also say which clip won.
Field names are ours or those of the files that publish such pairs:

    ours            id         prompt                   audio_a         audio_b      winner
    CMI-RewardBench (row nr)   prompt                   audio-path      audio2       preference
    Music Arena     uuid       prompt.prompt            a_audio_url     b_audio_url  vote.preference
    MIREX 2026      id         prompt                   audio_a         audio_b

Winners: A / B (also a, b, model_a, model_b), and ties: tie, both, neither, BOTH_BAD. A pair
of one clip with itself (the same path twice) is refused: it says nothing about an order."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, QamroError

FIELDS = {
    "id": ("id", "uuid", "pair_id"),
    "prompt": ("prompt", "text", "caption", "prompt_detailed"),
    "audio_a": ("audio_a", "audio-path", "a_audio_path", "a_audio_url", "audio1"),
    "audio_b": ("audio_b", "audio2", "b_audio_path", "b_audio_url"),
    "winner": ("winner", "preference", "vote"),
    "system_a": ("system_a",),  # the systems that made the clips (ours; optional: read by
    "system_b": ("system_b",),  # per-system recalibration, recalibrate.py)
}
WINNERS = {"a": "A", "model_a": "A", "b": "B", "model_b": "B", "tie": "tie", "both": "tie",
           "neither": "tie", "both_bad": "tie"}


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: str
    audio_a: Path
    audio_b: Path
    winner: str | None  # "A", "B", "tie", or None (unlabelled)
    system_a: str | None = None  # the system that made clip A, where the file says
    system_b: str | None = None


def _field(item: dict[str, Any], name: str):
    for key in FIELDS[name]:
        if item.get(key) not in (None, ""):
            return key, item[key]
    return None, None


def _text(value) -> str:
    """A prompt: a string, or Music Arena's prompt objects ({"prompt"} / {"overall_prompt"})."""
    if isinstance(value, dict):
        value = value.get("prompt") or value.get("overall_prompt") or ""
    return str(value or "")


def read_pairs(path: str | Path, labelled: bool = False) -> list[Pair]:
    """The pairs of a file, each checked: one line naming the file, the item and the problem.
    With `labelled`, every item must say which clip won."""
    path = Path(path)
    if not path.is_file():
        raise QamroError(f"{path}: no such pairs file")
    items = _items(path)
    if not items:
        raise DataError(f"{path}: no pairs in it")
    pairs, seen = [], set()
    for n, item in items:
        where = f"{path} item {n}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: not a JSON object")
        _, pid = _field(item, "id")
        pid = str(pid) if pid is not None else str(n)
        if pid in seen:
            raise DataError(f"{where}: id {pid!r} appears twice")
        seen.add(pid)
        audio = []
        for side in ("audio_a", "audio_b"):
            key, value = _field(item, side)
            if key is None:
                raise DataError(f"{where}: no {side} (one of {', '.join(FIELDS[side])})")
            if "://" in str(value):
                raise DataError(f"{where}: {key} is a URL ({value}); download the audio and "
                                f"give paths relative to the pairs file")
            audio.append(Path(value) if Path(value).is_absolute() else path.parent / value)
        if os.path.normpath(audio[0]) == os.path.normpath(audio[1]):
            raise DataError(f"{where}: clip A and clip B are the same file ({audio[0]}); a "
                            f"clip compared with itself says nothing about an order")
        winner = _winner(item, where) if labelled or _field(item, "winner")[0] else None
        if labelled and winner is None:
            raise DataError(f"{where}: no winner (one of {', '.join(FIELDS['winner'])})")
        systems = [_field(item, s)[1] for s in ("system_a", "system_b")]
        pairs.append(Pair(pid, _text(_field(item, "prompt")[1]), audio[0], audio[1], winner,
                          *(None if s is None else str(s) for s in systems)))
    return pairs


def _items(path: Path) -> list[tuple[int, Any]]:
    """(item number from 1, item) of a JSON-lines file or of a file holding one JSON list."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as a pairs file ({e})") from None
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except ValueError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e})") from None
    return out


def _winner(item: dict[str, Any], where: str) -> str | None:
    key, value = _field(item, "winner")
    if isinstance(value, dict):  # Music Arena: the vote object
        value = value.get("preference")
    if value is None:
        return None
    got = WINNERS.get(str(value).strip().lower())
    if got is None:
        raise DataError(f"{where}: {key} {value!r} is not a winner (A, B, model_a, model_b, "
                        f"or a tie: tie, both, neither, BOTH_BAD)")
    return got
