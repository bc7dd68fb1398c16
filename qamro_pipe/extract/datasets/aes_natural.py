"""AES-Natural (AudioMOS 2025 track 2), read as facebookresearch/audiobox-aesthetics publishes it
(folder audiomos2025_track2/):

    audiomos2025-track2-train_list.csv (2,700 rows), audiomos2025-track2-dev_list.csv (250):
        sample_id,data_path,Production_Quality,Production_Complexity,Content_Enjoyment,
        Content_Usefulness          (quoted where a field holds a comma; no system column)
        data_path = /your_path/<unbalanced_train_segments|musiccaps|MUSDB18|LibriTTS|
                    cv-corpus-13.0-2023-03-09|EARS>/...   (flac, mp3, wav)
    audiomos2025_track2_human_annotations.jsonl: the eval set's labels, one object per clip,
        {"data_path": "audiomos2025-track2-sys0v1wm-utt0dJodp", "Production_Quality": [10
        ratings], ...}; 36 systems x 85 clips, the system is the "sys..." part of the id
    audiomos2025-track2-eval-phase/DATA/wav/<id>.wav, DATA/sets/eval_list.txt: the eval audio
    evaluation_data/AES_natural_{music,sound,speech}.jsonl (same repository): the 10 ratings
        per axis behind every train and dev clip, keyed by data_path (optional)

The list and label files are looked for in `lists` (default: the root), and in its
audiomos2025_track2/ and evaluation_data/ folders, so a clone of the repository works as
`lists`. The root stands for the lists' placeholder /your_path/: "/your_path/musiccaps/x.wav"
is read as <root>/musiccaps/x.wav; a relative data_path is also taken under the root, and any
other absolute path is used as it is. The eval package is `eval_dir` (its DATA folder) when
given, else <root>/audiomos2025-track2-eval-phase/DATA or the same beside the root.

Labels PQ, PC, CE, CU are mean ratings on the 0-10 scale of the ratings; an empty CSV cell is
NaN. Eval labels are the means of the annotation file's ratings, and the ratings themselves go
into the cache with the clip; so do the train/dev ratings where evaluation_data/ is present
(their means must match the lists, which they do for every published clip). Train and dev clips
have no system ("" unless a CSV adds a `system` column); eval clips' systems come from their ids.

    load_dataset("aes-natural", root)                           # train, dev, eval if present
    load_dataset("aes-natural", root, splits=("train", "eval"), lists="~/audiobox-aesthetics")
    load_dataset("aes-natural", root, splits={"train": "my_list.csv"})   # your own CSVs
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

from ...errors import DataError
from .base import Clip, DatasetRecords, register_dataset, split_names
from .manifest import parse_score, read_table, require_files

NAME = "aes-natural"
LABEL_NAMES = ("PQ", "PC", "CE", "CU")
# the published column (and annotation key) of each label, in LABEL_NAMES order
LABEL_COLUMNS = ("Production_Quality", "Production_Complexity", "Content_Enjoyment",
                 "Content_Usefulness")
LABEL_RANGE = (0.0, 10.0)  # single ratings are 0-10 (eval annotations); means fall inside
ID_COLUMN, PATH_COLUMN, SYSTEM_COLUMN = "sample_id", "data_path", "system"
PLACEHOLDER = "/your_path/"  # the lists' stand-in for the folder holding the audio
LIST_FILES = {"train": "audiomos2025-track2-train_list.csv",
              "dev": "audiomos2025-track2-dev_list.csv"}
EVAL_SPLIT = "eval"
SPLITS = (*LIST_FILES, EVAL_SPLIT)
ANNOTATIONS = "audiomos2025_track2_human_annotations.jsonl"
RATINGS_FILES = ("AES_natural_music.jsonl", "AES_natural_sound.jsonl",
                 "AES_natural_speech.jsonl")
LIST_FOLDERS = (".", "audiomos2025_track2", "evaluation_data")  # the repository's folders
EVAL_PACKAGE = "audiomos2025-track2-eval-phase/DATA"
EVAL_LIST = "sets/eval_list.txt"
MEAN_TOLERANCE = 0.05 + 1e-6  # the lists round means of 10 ratings to one decimal
_SYSTEM = re.compile(r"-(sys[0-9A-Za-z]+)-")


@register_dataset(NAME)
def load_aes_natural(root: Path, splits: tuple[str, ...] | str | dict[str, str | Path] | None
                     = None, lists: str | Path | None = None,
                     eval_dir: str | Path | None = None) -> DatasetRecords:
    """Clips of the chosen splits: names from SPLITS (default: train and dev, and eval when its
    package is found), or {split: CSV path} for CSVs in the list format."""
    root = Path(root).expanduser()
    folders = [Path(lists or root).expanduser() / f for f in LIST_FOLDERS]
    if isinstance(splits, dict):
        files = {s: root / Path(f).expanduser() for s, f in splits.items()}  # absolute replaces
        for split, path in files.items():
            if not path.is_file():
                raise DataError(f"{path}: CSV of the {split!r} split not found")
        chosen: tuple[str, ...] = ()
    else:
        chosen = _check_splits(splits, root, eval_dir, folders)
        files = {s: _find(LIST_FILES[s], folders, f"the {s} list") for s in chosen
                 if s in LIST_FILES}

    listed: list[tuple[Clip, str]] = []
    origin: dict[str, str] = {}
    for split, path in files.items():
        listed += _read_split(root, path, split, origin)
    clips = _with_list_ratings(listed, origin, folders) if listed else []
    notes: list[str] = []
    if EVAL_SPLIT in chosen:
        eval_clips, notes = _read_eval(_eval_root(root, eval_dir), folders, origin)
        clips += eval_clips
    require_files((c.path, origin[c.id]) for c in clips)
    return DatasetRecords(name=NAME, label_names=LABEL_NAMES, clips=clips,
                          label_range=LABEL_RANGE, notes=tuple(notes))


def _check_splits(splits, root: Path, eval_dir, folders: list[Path]) -> tuple[str, ...]:
    if splits is None:
        found = [s for s, f in LIST_FILES.items() if any((d / f).is_file() for d in folders)]
        if _eval_root(root, eval_dir, required=False) is not None:
            found.append(EVAL_SPLIT)
        if not found:
            raise DataError(f"{NAME}: none of {', '.join(LIST_FILES.values())} found in "
                            f"{', '.join(map(str, folders))}, and no eval package; name the "
                            f"folder holding the lists with --lists")
        return tuple(found)
    return split_names(NAME, splits, SPLITS)


def _find(name: str, folders: list[Path], what: str, required: bool = True) -> Path | None:
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    if required:
        raise DataError(f"{name} ({what}) not found in {', '.join(map(str, folders))}; "
                        f"name the folder holding it with --lists")
    return None


def _audio_path(root: Path, data_path: str) -> Path:
    """root stands for the lists' /your_path/; relative paths are under root too."""
    if data_path.startswith(PLACEHOLDER):
        return root / data_path[len(PLACEHOLDER):]
    return root / Path(data_path).expanduser()  # an absolute path replaces root


def _read_split(root: Path, path: Path, split: str, origin: dict[str, str]
                ) -> list[tuple[Clip, str]]:
    """(clip, its data_path as listed: the key of the ratings files) of one list."""
    columns, header_line, rows = read_table(path)
    by_lower = {c.strip().lower(): c for c in columns}
    needed = (ID_COLUMN, PATH_COLUMN, *LABEL_COLUMNS)
    missing = [c for c in needed if c.lower() not in by_lower]
    if missing:
        raise DataError(f"{path}, line {header_line or 1}: missing column(s) "
                        f"{', '.join(missing)} (found: {', '.join(columns)})")
    col = {c: by_lower[c.lower()] for c in needed}
    system_col = by_lower.get(SYSTEM_COLUMN)

    out = []
    for line, rec in rows:
        where = f"{path}, line {line}"
        clip_id = str(rec.get(col[ID_COLUMN]) or "").strip()
        audio = str(rec.get(col[PATH_COLUMN]) or "").strip()
        if not clip_id or not audio:
            raise DataError(f"{where}: empty {ID_COLUMN if not clip_id else PATH_COLUMN}")
        if clip_id in origin:
            raise DataError(f"{where}: duplicate sample_id {clip_id!r} (first in "
                            f"{origin[clip_id]})")
        origin[clip_id] = where
        labels = tuple(parse_score(rec.get(col[c]), path, line, c, label_range=LABEL_RANGE,
                                   allow_empty=True) for c in LABEL_COLUMNS)
        system = str(rec.get(system_col) or "").strip() if system_col else ""
        out.append((Clip(id=clip_id, path=_audio_path(root, audio), system=system, split=split,
                         labels=labels), audio))
    return out


def _read_ratings(path: Path, key: str, wanted: set[str] | None = None
                  ) -> dict[str, tuple[tuple[tuple[float, ...], ...], str]]:
    """key value -> (ratings per label, "file, line") of a JSONL file of rating lists."""
    out: dict[str, tuple[tuple[tuple[float, ...], ...], str]] = {}
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            name = rec.get(key) if isinstance(rec, dict) else None
            if not isinstance(name, str) or not name.strip():
                raise DataError(f"{path}, line {n}: expected an object with a {key!r} string")
            if wanted is not None and name not in wanted:
                continue
            if name in out:
                raise DataError(f"{path}, line {n}: {name!r} appears twice (first on "
                                f"{out[name][1]})")
            out[name] = (tuple(_rating_list(rec.get(c), path, n, c) for c in LABEL_COLUMNS),
                         f"{path}, line {n}")
    return out


def _rating_list(values, path: Path, line: int, column: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise DataError(f"{path}, line {line}: {column!r} should be a list of ratings, found "
                        f"{json.dumps(values)}")
    return tuple(parse_score(v, path, line, column, label_range=LABEL_RANGE) for v in values)


def _rectangular(ratings: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
    """One width for every label (NaN-padded), as a Clip holds them."""
    width = max(len(r) for r in ratings)
    return tuple(r + (math.nan,) * (width - len(r)) for r in ratings)


def _mean(values: tuple[float, ...]) -> float:
    return sum(values) / len(values)


def _with_list_ratings(listed: list[tuple[Clip, str]], origin: dict[str, str],
                       folders: list[Path]) -> list[Clip]:
    """Train/dev clips with the ratings behind their means, where evaluation_data/ is found.
    A mean that does not match the list means the files do not belong together: refused."""
    paths = [p for p in (_find(f, folders, "", required=False) for f in RATINGS_FILES) if p]
    wanted = {data_path for _, data_path in listed}
    table: dict[str, tuple[tuple[tuple[float, ...], ...], str]] = {}
    for p in paths:
        table.update(_read_ratings(p, PATH_COLUMN, wanted))
    out = []
    for c, data_path in listed:
        if data_path not in table:
            out.append(c)
            continue
        ratings, where = table[data_path]
        for name, r, label in zip(LABEL_COLUMNS, ratings, c.labels):
            if not math.isnan(label) and abs(_mean(r) - label) > MEAN_TOLERANCE:
                raise DataError(f"{where}: the {len(r)} {name} ratings of {data_path!r} "
                                f"average {_mean(r):.3f}, but {origin[c.id]} lists {label:g}")
        out.append(replace(c, ratings=_rectangular(ratings)))
    return out


def _eval_root(root: Path, eval_dir, required: bool = True) -> Path | None:
    if eval_dir is not None:
        found = root / Path(eval_dir).expanduser()  # an absolute eval_dir replaces root
        if not (found / EVAL_LIST).is_file():
            raise DataError(f"{found / EVAL_LIST}: eval list not found (the eval folder is the "
                            f"eval package's DATA folder, {EVAL_PACKAGE})")
        return found
    tried = [root / EVAL_PACKAGE, root.parent / EVAL_PACKAGE]
    for folder in tried:
        if (folder / EVAL_LIST).is_file():
            return folder
    if required:
        raise DataError(f"{NAME}: the eval-phase package was not found: no {EVAL_LIST} in "
                        f"{', '.join(map(str, tried))}; name its DATA folder with --eval-dir")
    return None


def _read_eval(eval_root: Path, folders: list[Path], origin: dict[str, str]
               ) -> tuple[list[Clip], list[str]]:
    """The eval list's clips, labelled with the annotations' mean ratings where found."""
    listed = eval_root / EVAL_LIST
    ids: list[str] = []
    with open(listed, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            clip_id = line.strip()
            if not clip_id:
                continue
            clip_id = clip_id[:-4] if clip_id.lower().endswith(".wav") else clip_id
            where = f"{listed}, line {n}"
            if clip_id in origin:
                raise DataError(f"{where}: clip {clip_id!r} is listed twice (first in "
                                f"{origin[clip_id]})")
            if _SYSTEM.search(clip_id) is None:
                raise DataError(f"{where}: clip id {clip_id!r} names no system (expected "
                                f"audiomos2025-track2-sys<ID>-utt<ID>)")
            origin[clip_id] = where
            ids.append(clip_id)
    path = _find(ANNOTATIONS, folders, "the eval labels", required=False)
    table = _read_ratings(path, PATH_COLUMN) if path else {}
    known = set(ids)
    stray = [(k, where) for k, (_, where) in table.items() if k not in known]
    if stray:
        raise DataError(f"{stray[0][1]}: clip {stray[0][0]!r} is not in {listed} "
                        f"({len(stray)} such clip(s)): is this the annotation file of this "
                        f"eval package?")
    clips = []
    for clip_id in ids:
        ratings = table[clip_id][0] if clip_id in table else ()
        labels = tuple(_mean(r) for r in ratings) or (math.nan,) * len(LABEL_NAMES)
        clips.append(Clip(id=clip_id, path=eval_root / "wav" / f"{clip_id}.wav",
                          system=_SYSTEM.search(clip_id)[1], split=EVAL_SPLIT, labels=labels,
                          ratings=_rectangular(ratings) if ratings else ()))
    unlabelled = sum(1 for c in clips if not c.ratings)
    notes = [] if not unlabelled else [
        f"{listed}: {unlabelled} of {len(clips)} eval clips have no labels "
        + (f"in {path}" if path else f"({ANNOTATIONS} not found in "
           f"{', '.join(map(str, folders))})")]
    return clips, notes
