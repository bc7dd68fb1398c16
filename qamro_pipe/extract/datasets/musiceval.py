"""MusicEval (AudioMOS 2025 track 1), read in the layout it is published in.

    <root>/wav/audiomos2025-track1-S002_P044.wav        system S002, prompt P044
    <root>/sets/train_mos_list.txt, dev_mos_list.txt    wavname,overall,textual  (no header)
    <root>/sets/test_mos_list.txt                       the later labelled release: a `test`
                                                        split, same line format, audio in wav/
    <root>/prompt_info.txt                              tab-separated, header with id, text
    <root>/demo_prompt_info.txt                         tab-separated, id = wav name, text
    <root>/system_mos/system_mos_phase1.csv             S002,overall,textual      (no header)
    <root>/person_mos/<split>_person_mos.txt            optional: one line per rating,
                                                        wavname,rater_id,overall,textual
    audiomos2025-track1-eval-phase/DATA/                the eval phase, shipped separately:
        wav/, sets/eval_list.txt (ids, no labels), prompt_info.txt, demo_prompt_info.txt

Clip id = wav name without ".wav". Systems in CLIP_PROMPT_SYSTEMS have per-clip prompts in
demo_prompt_info.txt; their clips are looked up there first, then by prompt id in prompt_info.txt
like every other system's. Eval-phase clips take prompts from the eval package when it has its
own prompt tables, else from the root's. The eval package is `eval_dir` when given, else the
first of <root>/DATA, <root>/audiomos2025-track1-eval-phase/DATA and the same beside <root>.

Systems in the system MOS file with no listed clip are ignored with a note (records.notes).
Where person_mos/ is present, each clip's individual ratings (and rater ids) travel with it
into the cache; the label stays the list's MOS, and a rating mean that disagrees with it is
noted. The person_mos layout follows the ASTAR-NTU track 1 code (github.com/JethroWangSir/
ASTAR-NTU-AUDIOMOS2025-TRACK1, dataset/dataset_mos.py); no file of it was seen.

    load_dataset("musiceval", root, splits=("train", "dev", "eval"))
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ...errors import DataError
from .base import Clip, DatasetRecords, register_dataset, split_names
from .manifest import parse_score, require_files

NAME = "musiceval"
LABEL_NAMES = ("overall", "textual")
LABEL_RANGE = (1.0, 5.0)  # MOS: the mean of 5 ratings on a 1-5 scale
WAV_DIR = "wav"
WAV_PREFIX = "audiomos2025-track1-"  # as published; the loader accepts any prefix
LIST_FILES = {"train": "sets/train_mos_list.txt", "dev": "sets/dev_mos_list.txt"}
TEST_SPLIT = "test"
LABELLED_LISTS = {**LIST_FILES, TEST_SPLIT: "sets/test_mos_list.txt"}
PERSON_MOS = "person_mos/{split}_person_mos.txt"
PROMPT_FILE = "prompt_info.txt"
CLIP_PROMPT_FILE = "demo_prompt_info.txt"
# systems whose prompts are per clip (demo_prompt_info.txt), as the challenge baseline has them
CLIP_PROMPT_SYSTEMS = frozenset({"S001", "S006", "S013", "S017", "S018", "S033"})
SYSTEM_MOS_FILE = "system_mos/system_mos_phase1.csv"
EVAL_PACKAGE = "audiomos2025-track1-eval-phase/DATA"
EVAL_DIR = "DATA"  # where the eval package was linked into the root before it was searched for
EVAL_LIST = "sets/eval_list.txt"
EVAL_SPLIT = "eval"
SPLITS = (*LABELLED_LISTS, EVAL_SPLIT)
MEAN_TOLERANCE = 0.05  # a rating mean further than this from the list's MOS is noted
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
def load_musiceval(root: Path, splits: tuple[str, ...] | str | None = None,
                   system_mos: bool = True, eval_dir: str | Path | None = None) -> DatasetRecords:
    """Clips of the chosen splits (default: the labelled lists present: train, dev and, in the
    full release, test); system_mos=False skips the system MOS file (absent = {})."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: MusicEval root folder not found")
    splits = _check_splits(splits, root)
    eval_root = _eval_root(root, eval_dir) if EVAL_SPLIT in splits else None

    listed: list[_Listed] = []
    for split, rel in LABELLED_LISTS.items():
        # unselected lists are still read when present: their systems validate the system MOS
        if split in splits or (system_mos and (root / rel).is_file()):
            listed += _read_list(root / rel, split, len(LABEL_NAMES))
    if eval_root is not None:
        listed += _read_list(eval_root / EVAL_LIST, EVAL_SPLIT, 0)
    _check_unique(listed)
    known_systems = {x.system for x in listed}
    chosen = [x for x in listed if x.split in splits]

    prompts = _load_prompts(root)
    eval_prompts = _overlay(prompts, _load_prompts(eval_root)) if eval_root else prompts
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

    clips, notes = _with_person_ratings(root, clips, splits)
    sys_mos: dict[str, tuple[float, ...]] = {}
    if system_mos:
        sys_mos, sys_notes = _read_system_mos(root / SYSTEM_MOS_FILE, known_systems)
        notes += sys_notes
    return DatasetRecords(name=NAME, label_names=LABEL_NAMES, clips=clips, system_mos=sys_mos,
                          label_range=LABEL_RANGE, notes=tuple(notes))


def _check_splits(splits: tuple[str, ...] | str | None, root: Path) -> tuple[str, ...]:
    if splits is None:
        return tuple(s for s, rel in LABELLED_LISTS.items()
                     if s in LIST_FILES or (root / rel).is_file())
    return split_names("musiceval", splits, SPLITS)


def _eval_root(root: Path, eval_dir: str | Path | None) -> Path:
    """The eval package's DATA folder: eval_dir (relative to root), else the first found of
    root/DATA, root/<package> and <package> beside root."""
    if eval_dir is not None:
        found = root / eval_dir  # an absolute eval_dir replaces root
        if not (found / EVAL_LIST).is_file():
            raise DataError(f"{found / EVAL_LIST}: eval list not found (the eval folder is the "
                            f"eval package's DATA folder, {EVAL_PACKAGE})")
        return found
    tried = [root / EVAL_DIR, root / EVAL_PACKAGE, root.parent / EVAL_PACKAGE]
    for folder in tried:
        if (folder / EVAL_LIST).is_file():
            return folder
    raise DataError(f"musiceval: the eval-phase package was not found: no {EVAL_LIST} in "
                    f"{', '.join(map(str, tried))}; name its DATA folder with --eval-dir")


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


def _with_person_ratings(root: Path, clips: list[Clip], splits: tuple[str, ...]
                         ) -> tuple[list[Clip], list[str]]:
    """Clips with their individual ratings from person_mos/<split>_person_mos.txt where that
    file exists, and notes on what did not match the lists."""
    notes: list[str] = []
    for split in splits:
        path = root / PERSON_MOS.format(split=split)
        if split == EVAL_SPLIT or not path.is_file():
            continue
        mine = {c.id: i for i, c in enumerate(clips) if c.split == split}
        rated, unknown = _read_person_mos(path, set(mine))
        far = []
        for clip_id, rows in rated.items():
            c = clips[mine[clip_id]]
            ratings = tuple(tuple(r[k] for r in rows) for k in (1, 2))
            means = [sum(r) / len(r) for r in ratings]
            if any(abs(m - v) > MEAN_TOLERANCE for m, v in zip(means, c.labels)):
                far.append(f"{clip_id} (means {means[0]:.2f},{means[1]:.2f}, list "
                           f"{c.labels[0]:g},{c.labels[1]:g})")
            clips[mine[clip_id]] = replace(c, ratings=ratings, raters=tuple(r[0] for r in rows))
        if unknown:
            notes.append(f"{path}: ignored {len(unknown)} line(s) naming clips not in the "
                         f"{split} list (first: {unknown[0]})")
        if len(rated) < len(mine):
            notes.append(f"{path}: no individual ratings for {len(mine) - len(rated)} of the "
                         f"{len(mine)} {split} clips")
        if far:
            notes.append(f"{path}: for {len(far)} clip(s) the mean rating differs from the "
                         f"list's MOS by more than {MEAN_TOLERANCE} (the list's MOS is the "
                         f"label): {'; '.join(far[:_SHOW_MISSING])}")
    return clips, notes


def _read_person_mos(path: Path, wanted: set[str]
                     ) -> tuple[dict[str, list[tuple[str, float, float]]], list[str]]:
    """clip id -> [(rater, overall, textual)] in file order, and lines of other clips."""
    rated: dict[str, list[tuple[str, float, float]]] = {}
    unknown: list[str] = []
    for n, line in _lines(path):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2 + len(LABEL_NAMES):
            raise DataError(f"{path}, line {n}: expected {2 + len(LABEL_NAMES)} comma-separated "
                            f"fields (wavname,rater_id,overall,textual), found {len(fields)}")
        clip_id = fields[0][:-4] if fields[0].lower().endswith(".wav") else fields[0]
        scores = [parse_score(v, path, n, name, label_range=LABEL_RANGE)
                  for v, name in zip(fields[2:], LABEL_NAMES)]
        if clip_id not in wanted:
            unknown.append(f"{clip_id}, line {n}")
            continue
        rated.setdefault(clip_id, []).append((fields[1], *scores))
    return rated, unknown


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


def _read_system_mos(path: Path, known_systems: set[str]
                     ) -> tuple[dict[str, tuple[float, ...]], list[str]]:
    """System -> published MOS, and a note naming systems that have no listed clip (the
    phase-1 file may list systems whose clips are elsewhere: they are ignored)."""
    if not path.is_file():
        return {}, []  # optional in the published layout
    out: dict[str, tuple[float, ...]] = {}
    first_line: dict[str, int] = {}
    ignored: list[str] = []
    for n, line in _lines(path):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 1 + len(LABEL_NAMES):
            raise DataError(f"{path}, line {n}: expected {1 + len(LABEL_NAMES)} comma-separated "
                            f"fields (system,overall,textual), found {len(fields)}")
        system = fields[0]
        if system in first_line:
            raise DataError(f"{path}, line {n}: system {system!r} appears twice "
                            f"(first on line {first_line[system]})")
        first_line[system] = n
        values = tuple(parse_score(v, path, n, name, label_range=LABEL_RANGE)
                       for v, name in zip(fields[1:], LABEL_NAMES))
        if system in known_systems:
            out[system] = values
        else:
            ignored.append(f"{system} (line {n})")
    notes = [f"{path}: ignored {len(ignored)} system(s) with no listed clip: "
             f"{', '.join(ignored)}"] if ignored else []
    return out, notes
