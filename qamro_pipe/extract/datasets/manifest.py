"""A user's own clips: a CSV, TSV or JSONL manifest naming audio files and scores.

The file name's ending chooses the format: .csv is comma-separated, .tsv (or .tab) is
tab-separated (both with a header line and CSV quoting: a field holding the separator is quoted
"like, this"), .jsonl (or .ndjson) is one JSON object per line. A .csv whose header holds tabs
and no commas is refused with a hint to name it .tsv.

Columns (CSV header / JSONL keys; the reserved names match case-insensitively):

    id      required, unique
    path    required; relative paths are resolved against the manifest's folder
    system  optional; "" when absent (system-level metrics need it)
    text    optional prompt
    split   optional; "train" when absent or empty
    start, end   optional, seconds into the file; empty = whole file

Every other column is a score column; the score columns, in file order, become the label
names. An empty score cell (or JSON null / a missing key) is NaN: that clip has no label there.

    load_dataset("manifest", "/data/my_clips.csv", label_range=(1, 5))

Also home of the small table helpers the other loaders share (read_table, parse_score,
require_files), so every loader reports bad input the same way: file, line, what is wrong.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

from ...errors import DataError
from ...untrusted import file_kind, require_regular_file
from .base import Clip, DatasetRecords, register_dataset

RESERVED = ("id", "path", "system", "text", "split", "start", "end")
DEFAULT_SPLIT = "train"
# the split names training and reporting read (train; dev by default; test and eval by
# --eval-split, as the published data sets name theirs); another is likely a typo: noted
KNOWN_SPLITS = ("train", "dev", "test", "eval")
CSV_SUFFIXES = (".csv",)
TSV_SUFFIXES = (".tsv", ".tab")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SHOW_MISSING = 5  # how many missing files an error message lists by name

Row = tuple[int, dict[str, object]]  # (line the record starts on, column -> raw value)


def read_table(path: Path) -> tuple[list[str], int | None, list[Row]]:
    """Columns (in file order), header line (None for JSONL) and rows of a CSV or JSONL file."""
    require_regular_file(path, "manifest")  # a FIFO would block the open forever
    suffix = path.suffix.lower()
    try:
        if suffix in CSV_SUFFIXES + TSV_SUFFIXES:
            return _read_csv(path, "\t" if suffix in TSV_SUFFIXES else ",")
        if suffix in JSONL_SUFFIXES:
            columns, rows = _read_jsonl(path)
            return columns, None, rows
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at "
                        f"offset {e.start}); save it as UTF-8") from None
    raise DataError(f"{path}: unknown table format {path.suffix!r}; "
                    f"expected one of {', '.join(CSV_SUFFIXES + TSV_SUFFIXES + JSONL_SUFFIXES)}")


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], int, list[Row]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header, header_line, rows, last = None, 0, [], 0
        try:
            for fields in reader:
                start, last = last + 1, reader.line_num
                if not any(x.strip() for x in fields):
                    continue  # blank line
                if header is None:
                    header, header_line = [x.strip() for x in fields], start
                    if len(header) == 1 and "\t" in header[0]:
                        raise DataError(f"{path}, line {start}: the header is tab-separated; "
                                        f"name a tab-separated file .tsv")
                    _check_header(path, header_line, header)
                    continue
                if len(fields) != len(header):
                    raise DataError(f"{path}, line {start}: expected {len(header)} fields "
                                    f"({','.join(header)}), found {len(fields)}")
                rows.append((start, dict(zip(header, fields))))
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
    if header is None:
        raise DataError(f"{path}: empty file, expected a header line")
    return header, header_line, rows


def _check_header(path: Path, line: int, header: list[str]) -> None:
    seen: set[str] = set()
    for name in header:
        if not name:
            raise DataError(f"{path}, line {line}: header has an empty column name")
        if name.lower() in seen:
            raise DataError(f"{path}, line {line}: column {name!r} appears twice in the header")
        seen.add(name.lower())


def _read_jsonl(path: Path) -> tuple[list[str], list[Row]]:
    columns: dict[str, str] = {}  # lower-case -> key as first seen; insertion order = file order
    rows: list[Row] = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            except (ValueError, RecursionError) as e:  # a 5,000-digit integer, deep nesting
                raise DataError(f"{path}, line {n}: not a manifest record "
                                f"({str(e).split('.')[0] or 'nested too deeply'})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {n}: expected a JSON object, "
                                f"found {type(record).__name__}")
            for key in record:
                first = columns.setdefault(key.strip().lower(), key)
                if first != key:
                    raise DataError(f"{path}, line {n}: key {key!r} differs from {first!r} "
                                    f"only in case or spacing")
            rows.append((n, record))
    return list(columns.values()), rows


def parse_score(value: object, path: Path, line: int, column: str, *,
                label_range: tuple[float, float] | None = None, allow_empty: bool = False) -> float:
    """A finite score, or NaN for an empty cell where allow_empty; DataError otherwise."""
    where = f"{path}, line {line}, column {column!r}"
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_empty:
            return math.nan
        raise DataError(f"{where}: empty score")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{where}: {value!r} is not a number")
    try:
        v = float(value)
    except ValueError:
        raise DataError(f"{where}: {value!r} is not a number") from None
    if math.isnan(v):  # an unknown label is an empty cell; a written NaN is a mistake
        raise DataError(f"{where}: {value!r} is not a number" + (
            "; leave the cell empty (JSON: null) for an unknown label" if allow_empty else ""))
    if not math.isfinite(v):
        raise DataError(f"{where}: {value!r} is not a finite number")
    if label_range is not None and not label_range[0] <= v <= label_range[1]:
        raise DataError(f"{where}: {v:g} is outside the scale [{label_range[0]:g}, "
                        f"{label_range[1]:g}]")
    return v


def _is_file(path: Path, origin: str) -> bool:
    try:
        return path.is_file()
    except OSError as e:  # a path too long for the file system, ...
        shown = str(path) if len(str(path)) <= 120 else f"{str(path)[:60]}...{str(path)[-40:]}"
        raise DataError(f"{shown} ({origin}; {len(str(path)):,} characters): "
                        f"{e.strerror}") from None


def require_files(listed: Iterable[tuple[Path, str]], what: str = "audio file(s)") -> None:
    """Raise one DataError naming every missing file's count and the first few (with origin)."""
    missing = [(p, origin) for p, origin in listed if not _is_file(p, origin)]
    if not missing:
        return
    shown = "; ".join(f"{p} ({origin})" for p, origin in missing[:_SHOW_MISSING])
    more = f"; and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
    raise DataError(f"{len(missing)} {what} missing: {shown}{more}")


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _seconds(value: object, path: Path, line: int, column: str) -> float | None:
    if _text(value) == "":
        return None
    v = parse_score(value, path, line, column)
    if v < 0:
        raise DataError(f"{path}, line {line}, column {column!r}: negative time {v:g}")
    return v


@register_dataset("manifest")
def load_manifest(root: Path, label_range: tuple[float, float] | None = None,
                  name: str | None = None) -> DatasetRecords:
    """Clips of the manifest file `root`; name defaults to the file's stem."""
    path = Path(root)
    if file_kind(path) not in (None, "a folder"):  # a FIFO would block the open forever
        require_regular_file(path, "manifest")
    if path.is_dir():
        raise DataError(f"{path} is a folder; the manifest loader takes the manifest file "
                        f"itself (.csv, .tsv or .jsonl)")
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    if label_range is not None:
        label_range = (float(label_range[0]), float(label_range[1]))
    columns, header_line, rows = read_table(path)
    col = {c.strip().lower(): c for c in columns if c.strip().lower() in RESERVED}
    for required in ("id", "path"):
        if required not in col:
            raise DataError(f"{path}, line {header_line or 1}: no {required!r} column "
                            f"(columns: {', '.join(columns) or 'none'})")
    scores = [c for c in columns if c.strip().lower() not in RESERVED]

    clips, first_line, listed = [], {}, []
    for line, rec in rows:
        clip = _manifest_clip(path, line, rec, col, scores, label_range)
        if clip.id in first_line:
            raise DataError(f"{path}, line {line}: duplicate id {clip.id!r} "
                            f"(first on line {first_line[clip.id]})")
        first_line[clip.id] = line
        clips.append(clip)
        listed.append((clip.path, f"{path.name}, line {line}"))
    require_files(listed)
    return DatasetRecords(name=name or path.stem, label_names=tuple(s.strip() for s in scores),
                          clips=clips, label_range=label_range,
                          notes=_notes(path, clips, scores, label_range))


def _notes(path: Path, clips: list[Clip], scores: list[str],
           label_range: tuple[float, float] | None) -> tuple[str, ...]:
    """What a user should see before training: split names nothing reads (a typo trains
    nothing), and the scores' span where no scale was declared to check them against."""
    notes = []
    counts: dict[str, int] = {}
    for c in clips:
        counts[c.split] = counts.get(c.split, 0) + 1
    for split, n in counts.items():
        if split not in KNOWN_SPLITS:
            notes.append(f"{path}: split {split!r} ({n} clips) is none of "
                         f"{', '.join(KNOWN_SPLITS)}: training reads 'train' and reports on "
                         f"'dev' (--eval-split names another); a typo?")
    if label_range is None:
        for k, name in enumerate(scores):
            vals = [c.labels[k] for c in clips if not math.isnan(c.labels[k])]
            if vals:
                notes.append(f"{path}: scores of {name.strip()!r} span {min(vals):g} to "
                             f"{max(vals):g}, unchecked; declare the scale with --label-range "
                             f"LO,HI to refuse scores outside it")
    return tuple(notes)


def _manifest_clip(path: Path, line: int, rec: dict, col: dict[str, str], scores: list[str],
                   label_range: tuple[float, float] | None) -> Clip:
    def get(key: str) -> object:
        return rec.get(col[key]) if key in col else None

    clip_id, audio = _text(get("id")), _text(get("path"))
    if not clip_id:
        raise DataError(f"{path}, line {line}: empty id")
    if not audio:
        raise DataError(f"{path}, line {line}: empty path for id {clip_id!r}")
    audio_path = Path(audio).expanduser()
    if not audio_path.is_absolute():
        audio_path = path.parent / audio_path
    start = _seconds(get("start"), path, line, col.get("start", "start"))
    end = _seconds(get("end"), path, line, col.get("end", "end"))
    if start is not None and end is not None and start >= end:
        raise DataError(f"{path}, line {line}: start {start:g} s is not before end {end:g} s")
    labels = tuple(parse_score(rec.get(s), path, line, s, label_range=label_range,
                               allow_empty=True) for s in scores)
    return Clip(id=clip_id, path=audio_path, system=_text(get("system")),
                split=_text(get("split")) or DEFAULT_SPLIT, labels=labels,
                text=_text(get("text")), start=start, end=end)
