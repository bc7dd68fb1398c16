"""AES-Natural (AudioMOS 2025 track 2): one CSV per split, as published.

    sample_id,data_path,Production_Quality,Production_Complexity,Content_Enjoyment,
    Content_Usefulness      (one header line; optional extra column: system)

`data_path` is resolved against the root folder (absolute paths stay as they are). The four
axes become labels PQ, PC, CE, CU on the Audiobox-Aesthetics 1-10 scale; an empty score cell is
NaN (an unlabelled split). Clips carry no prompt text.

The published files have no system column, so every clip's system is "" and system-level
metrics cannot be computed; add a `system` column to the CSVs (or use the generic `manifest`
loader) where system-level numbers are wanted.

    load_dataset("aes-natural", root)                       # root/train.csv, root/dev.csv
    load_dataset("aes-natural", root, splits={"train": "a.csv", "dev": "b.csv"})
"""
from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from .base import Clip, DatasetRecords, register_dataset
from .manifest import parse_score, read_table, require_files

NAME = "aes-natural"
LABEL_NAMES = ("PQ", "PC", "CE", "CU")
# the CSV column of each label, in LABEL_NAMES order
LABEL_COLUMNS = ("Production_Quality", "Production_Complexity", "Content_Enjoyment",
                 "Content_Usefulness")
LABEL_RANGE = (1.0, 10.0)
ID_COLUMN, PATH_COLUMN, SYSTEM_COLUMN = "sample_id", "data_path", "system"
DEFAULT_SPLIT_FILES = {"train": "train.csv", "dev": "dev.csv"}


@register_dataset(NAME)
def load_aes_natural(root: Path, splits: dict[str, str | Path] | None = None) -> DatasetRecords:
    """Clips of each split's CSV; by default root/train.csv and root/dev.csv, those present."""
    root = Path(root)
    if splits is None:
        files = {s: root / f for s, f in DEFAULT_SPLIT_FILES.items() if (root / f).is_file()}
        if not files:
            raise DataError(f"{root}: none of {', '.join(DEFAULT_SPLIT_FILES.values())} found; "
                            f"pass splits={{'train': path, ...}} to name the CSV files")
    else:
        files = {s: root / f for s, f in splits.items()}  # an absolute path replaces root
        for split, path in files.items():
            if not path.is_file():
                raise DataError(f"{path}: CSV of the {split!r} split not found")

    clips: list[Clip] = []
    origin: dict[str, str] = {}
    for split, path in files.items():
        for clip, where in _read_split(root, path, split):
            if clip.id in origin:
                raise DataError(f"{where}: duplicate sample_id {clip.id!r} "
                                f"(first in {origin[clip.id]})")
            origin[clip.id] = where
            clips.append(clip)
    require_files((c.path, origin[c.id]) for c in clips)
    return DatasetRecords(name=NAME, label_names=LABEL_NAMES, clips=clips,
                          label_range=LABEL_RANGE)


def _read_split(root: Path, path: Path, split: str) -> list[tuple[Clip, str]]:
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
        labels = tuple(parse_score(rec.get(col[c]), path, line, c, label_range=LABEL_RANGE,
                                   allow_empty=True) for c in LABEL_COLUMNS)
        system = str(rec.get(system_col) or "").strip() if system_col else ""
        out.append((Clip(id=clip_id, path=root / Path(audio).expanduser(), system=system,
                         split=split, labels=labels), where))
    return out
