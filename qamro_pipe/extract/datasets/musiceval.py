"""MusicEval (AudioMOS 2025 track 1), read in the layout it is published in.

    <root>/wav/audiomos2025-track1-S002_P044.wav        system S002, prompt P044
    <root>/sets/train_mos_list.txt, dev_mos_list.txt    wavname,overall,textual  (no header)
    <root>/prompt_info.txt                              tab-separated, header with id, text
    <root>/demo_prompt_info.txt                         tab-separated, id = wav name, text
    <root>/system_mos/system_mos_phase1.csv             S002,overall,textual      (no header)
    <root>/DATA/wav/, DATA/sets/eval_list.txt           eval phase: ids, no labels

Clip id = wav name without ".wav". Systems in CLIP_PROMPT_SYSTEMS have per-clip prompts in
demo_prompt_info.txt; their clips are looked up there first, then by prompt id in prompt_info.txt
like every other system's. Eval-phase clips take prompts from DATA/ when it has its own prompt
tables, else from the root's.

    load_dataset("musiceval", root, splits=("train", "dev", "eval"))
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import DataError
from .base import Clip, DatasetRecords, register_dataset
from .manifest import parse_score, require_files

NAME = "musiceval"
LABEL_NAMES = ("overall", "textual")
LABEL_RANGE = (1.0, 5.0)  # MOS: the mean of 5 ratings on a 1-5 scale
WAV_DIR = "wav"
WAV_PREFIX = "audiomos2025-track1-"  # as published; the loader accepts any prefix
LIST_FILES = {"train": "sets/train_mos_list.txt", "dev": "sets/dev_mos_list.txt"}
PROMPT_FILE = "prompt_info.txt"
CLIP_PROMPT_FILE = "demo_prompt_info.txt"
# systems whose prompts are per clip (demo_prompt_info.txt), as the challenge baseline has them
CLIP_PROMPT_SYSTEMS = frozenset({"S001", "S006", "S013", "S017", "S018", "S033"})
SYSTEM_MOS_FILE = "system_mos/system_mos_phase1.csv"
EVAL_DIR = "DATA"
EVAL_LIST = "sets/eval_list.txt"
EVAL_SPLIT = "eval"
SPLITS = (*LIST_FILES, EVAL_SPLIT)
_WAV_NAME = re.compile(r"^.+-(S[0-9A-Za-z]+)_(P[0-9A-Za-z]+)$")
_SHOW_MISSING = 5


@dataclass(frozen=True)
class _Listed:
    """One line of a list file."""

    name: str  # wav file name, with .wav
    id: str
    system: str
    prompt: str
    labels: tuple[float, ...]
    split: str
    origin: str  # "train_mos_list.txt, line 3", for error messages


@dataclass
class _Prompts:
    """The two prompt tables of one folder (empty where the file is absent)."""

    per_prompt: dict[str, str] = field(default_factory=dict)
    per_clip: dict[str, str] = field(default_factory=dict)  # clip id (no .wav) -> text
    files: list[str] = field(default_factory=list)  # files read, for error messages


@register_dataset(NAME)
def load_musiceval(root: Path, splits: tuple[str, ...] | str = ("train", "dev"),
                   system_mos: bool = True, eval_dir: str | Path = EVAL_DIR) -> DatasetRecords:
    """Clips of the chosen splits; system_mos=False skips the system MOS file (absent = {})."""
    root = Path(root)
    splits = _check_splits(splits)
    if not root.is_dir():
        raise DataError(f"{root}: MusicEval root folder not found")
    eval_root = root / eval_dir  # an absolute eval_dir replaces root

    listed: list[_Listed] = []
    for split, rel in LIST_FILES.items():
        # unselected lists are still read when present: their systems validate the system MOS
        if split in splits or (system_mos and (root / rel).is_file()):
            listed += _read_list(root / rel, split, len(LABEL_NAMES))
    if EVAL_SPLIT in splits:
        listed += _read_list(eval_root / EVAL_LIST, EVAL_SPLIT, 0)
    _check_unique(listed)
    known_systems = {x.system for x in listed}
    chosen = [x for x in listed if x.split in splits]

    prompts = _load_prompts(root)
    eval_prompts = _overlay(prompts, _load_prompts(eval_root)) if EVAL_SPLIT in splits else prompts
    clips, no_prompt = [], []
    for x in chosen:
        wav_dir = (eval_root if x.split == EVAL_SPLIT else root) / WAV_DIR
        text = _prompt_text(x, eval_prompts if x.split == EVAL_SPLIT else prompts)
        if text is None:
            no_prompt.append(x)
        clips.append(Clip(id=x.id, path=wav_dir / x.name, system=x.system, split=x.split,
                          labels=x.labels, text=text or ""))
    if no_prompt:
        _raise_no_prompt(no_prompt, prompts, eval_prompts)
    require_files((c.path, x.origin) for c, x in zip(clips, chosen))

    sys_mos = _read_system_mos(root / SYSTEM_MOS_FILE, known_systems) if system_mos else {}
    return DatasetRecords(name=NAME, label_names=LABEL_NAMES, clips=clips, system_mos=sys_mos,
                          label_range=LABEL_RANGE)


def _check_splits(splits: tuple[str, ...] | str) -> tuple[str, ...]:
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise DataError(f"musiceval: unknown split(s) {', '.join(map(repr, unknown)) or '(none)'}; "
                        f"choose from {', '.join(SPLITS)}")
    return splits


def _lines(path: Path):
    """(line number, stripped text) of the non-blank lines of a small text file."""
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line.strip()


def _read_list(path: Path, split: str, n_scores: int) -> list[_Listed]:
    if not path.is_file():
        raise DataError(f"{path}: list of the {split!r} split not found")
    fields_doc = "wavname,overall,textual" if n_scores else "one clip id a line"
    out = []
    for n, line in _lines(path):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 1 + n_scores:
            raise DataError(f"{path}, line {n}: expected {1 + n_scores} comma-separated "
                            f"field(s) ({fields_doc}), found {len(fields)}")
        labels = tuple(parse_score(v, path, n, name, label_range=LABEL_RANGE)
                       for v, name in zip(fields[1:], LABEL_NAMES))
        clip_id = fields[0][:-4] if fields[0].lower().endswith(".wav") else fields[0]
        match = _WAV_NAME.match(clip_id)
        if match is None:
            raise DataError(f"{path}, line {n}: wav name {fields[0]!r} does not parse as "
                            f"<prefix>-S<system>_P<prompt>.wav")
        name = fields[0] if fields[0] != clip_id else clip_id + ".wav"
        out.append(_Listed(name=name, id=clip_id, system=match[1], prompt=match[2],
                           labels=labels or (math.nan,) * len(LABEL_NAMES), split=split,
                           origin=f"{path.name}, line {n}"))
    return out


def _check_unique(listed: list[_Listed]) -> None:
    first: dict[str, _Listed] = {}
    for x in listed:
        if x.id in first:
            raise DataError(f"{x.origin}: clip {x.id!r} is listed twice "
                            f"(first in {first[x.id].origin})")
        first[x.id] = x


def _read_prompt_table(path: Path, strip_wav: bool) -> dict[str, str]:
    """id -> text of a tab-separated table whose header names the id and text columns."""
    table: dict[str, tuple[str, int]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t")  # quoting as pandas reads it (the baseline)
        id_col = text_col = None
        for row in reader:
            n = reader.line_num
            if not any(x.strip() for x in row):
                continue
            if id_col is None:
                header = [x.strip().lower() for x in row]
                if "id" not in header or "text" not in header:
                    raise DataError(f"{path}, line {n}: header needs columns 'id' and 'text' "
                                    f"(found: {', '.join(row)})")
                id_col, text_col = header.index("id"), header.index("text")
                continue
            if len(row) <= max(id_col, text_col) or not row[id_col].strip() \
                    or not row[text_col].strip():
                continue  # an incomplete row; a clip that needs it is reported by name
            key, text = row[id_col].strip(), row[text_col].strip()
            if strip_wav and key.lower().endswith(".wav"):
                key = key[:-4]
            if key in table and table[key][0] != text:
                raise DataError(f"{path}, line {n}: id {key!r} has a second, different text "
                                f"(first on line {table[key][1]})")
            table.setdefault(key, (text, n))
    return {k: t for k, (t, _) in table.items()}


def _load_prompts(folder: Path) -> _Prompts:
    out = _Prompts()
    for rel, per_clip in ((PROMPT_FILE, False), (CLIP_PROMPT_FILE, True)):
        path = folder / rel
        if path.is_file():
            table = _read_prompt_table(path, strip_wav=per_clip)
            (out.per_clip if per_clip else out.per_prompt).update(table)
            out.files.append(str(path))
    return out


def _overlay(base: _Prompts, top: _Prompts) -> _Prompts:
    return _Prompts({**base.per_prompt, **top.per_prompt}, {**base.per_clip, **top.per_clip},
                    base.files + top.files)


def _prompt_text(x: _Listed, prompts: _Prompts) -> str | None:
    if x.system in CLIP_PROMPT_SYSTEMS and x.id in prompts.per_clip:
        return prompts.per_clip[x.id]
    return prompts.per_prompt.get(x.prompt)


def _raise_no_prompt(missing: list[_Listed], prompts: _Prompts, eval_prompts: _Prompts) -> None:
    shown = "; ".join(f"{x.id} (system {x.system}, prompt {x.prompt}, {x.origin})"
                      for x in missing[:_SHOW_MISSING])
    more = f"; and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
    read = sorted(set(prompts.files + eval_prompts.files))
    raise DataError(f"no prompt text for {len(missing)} clip(s): {shown}{more}. Looked in: "
                    f"{', '.join(read) or f'nothing ({PROMPT_FILE} not found)'}")


def _read_system_mos(path: Path, known_systems: set[str]) -> dict[str, tuple[float, ...]]:
    if not path.is_file():
        return {}  # optional in the published layout
    out: dict[str, tuple[float, ...]] = {}
    first_line: dict[str, int] = {}
    for n, line in _lines(path):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 1 + len(LABEL_NAMES):
            raise DataError(f"{path}, line {n}: expected {1 + len(LABEL_NAMES)} comma-separated "
                            f"fields (system,overall,textual), found {len(fields)}")
        system = fields[0]
        if system in out:
            raise DataError(f"{path}, line {n}: system {system!r} appears twice "
                            f"(first on line {first_line[system]})")
        if system not in known_systems:
            raise DataError(f"{path}, line {n}: unknown system {system!r}: no listed clip is "
                            f"from it")
        out[system] = tuple(parse_score(v, path, n, name, label_range=LABEL_RANGE)
                            for v, name in zip(fields[1:], LABEL_NAMES))
        first_line[system] = n
    return out
