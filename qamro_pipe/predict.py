"""Score new audio with a trained run: `predict` is the Scorer (scorer.py) over files. The
run's backbone (and those of the other caches its heads read) embed the files in memory as
each cache recorded its settings, and the run's heads score them. Bad files are reported
one by one and the others still scored."""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import QamroError
from .extract.datasets import Clip, DatasetRecords, load_dataset
from .extract.memory import Item
from .recalibrate import apply_offsets
from .scorer import Scorer, clip_ids, sd_name
from .untrusted import answer_ids_problem

__all__ = ["predict", "check_outputs", "clip_ids", "sd_name", "score_columns", "scores_csv",
           "write_scores", "write_answer"]


def _records(files: list[str | Path], manifest: str | Path | None, text: str | None):
    if manifest and files:
        raise QamroError(f"give audio files or --manifest, not both ({len(files)} file(s) and "
                         f"{manifest}); list every clip in the manifest")
    if manifest:
        recs = load_dataset("manifest", manifest)
        if text is not None:
            recs = replace(recs, clips=[replace(c, text=text) for c in recs.clips])
        return recs
    if not files:
        raise QamroError("nothing to score: give audio files or --manifest FILE")
    for f in files:
        if Path(f).is_dir():
            raise QamroError(f"{f}: is a folder; give its audio files (e.g. {Path(f) / '*.wav'})"
                             f" or a --manifest listing them")
    if len({Path(f).resolve() for f in files}) != len(files):
        raise QamroError("the same file is given twice")
    ids = clip_ids([Path(f) for f in files])
    clips = [Clip(id=i, path=Path(f), system="", split="predict", labels=(), text=text or "")
             for i, f in zip(ids, files)]
    return DatasetRecords(name="predict", label_names=(), clips=clips)


def text_note(scorer: Scorer, recs: DatasetRecords) -> str | None:
    """A run whose heads read the prompt, given clips without one: they are scored with an
    empty text, which the user should know."""
    empty = sum(1 for c in recs.clips if not c.text)
    if not empty or not any(ex.texts for ex in scorer.extractors):
        return None
    heads = [h.name for h in scorer.trained.heads if any("text" in f for f in h.features)]
    return (f"{empty} of {len(recs.clips)} clip(s) have no prompt, and head(s) "
            f"{', '.join(heads) or 'of this run'} read one: they are scored with an empty "
            f"text; give --text or a manifest text column")


def predict(run: str | Path, files: list[str | Path] | None = None,
            manifest: str | Path | None = None, text: str | None = None,
            members: str | None = None, scorer: Scorer | None = None,
            notes: list[str] | None = None, answer: bool = False, system: str | None = None,
            **extract_opts):
    """-> (head names, rows [{"id", head: score, head_sd: spread, ...}], failures {id:
    reason}). A score is the mean over the run's members (or those `members` selects, as
    `evaluate --members`); head_sd, their sd (ddof=1), is there when there are several.
    `extract_opts`: checkpoint, tokenizer_dir, device, batch_size (Scorer.load's). What the
    user should know (clips scored without the prompt a head reads) is appended to
    `notes`. `answer`: the rows go to an answer file, so ids it cannot carry are refused
    first. `system`: every clip is that system's, whose recorded offset (calibrate-system)
    is added to each head's score."""
    recs = _records(list(files or []), manifest, text)
    problem = answer and answer_ids_problem(c.id for c in recs.clips)
    if problem:  # before any audio is decoded or the backbone loaded
        raise QamroError(f"--answer: {problem}")
    scorer = scorer or Scorer.load(run, members=members, **extract_opts)
    offsets = scorer.offsets(system)  # before any audio is decoded
    note = text_note(scorer, recs)
    if note and notes is not None:
        notes.append(note)
    items = [Item(id=c.id, path=c.path, start=c.start, end=c.end, text=c.text)
             for c in recs.clips]
    rows, failures = scorer.score_items(items)
    if offsets:
        apply_offsets(rows, offsets)
    return scorer.heads, rows, failures


def check_outputs(*paths: str | Path | None, force: bool = False) -> None:
    """Before any scoring: each output file can be written where it is named. Missing
    folders are created; a folder, an existing file (without force) or the same file named
    twice is refused, so no scores are computed only to be lost."""
    given = [Path(p) for p in paths if p is not None]
    if len({p.resolve() for p in given}) != len(given):
        raise QamroError("--out and --answer name the same file; give two files")
    for path in given:
        if path.is_dir():
            raise QamroError(f"{path}: is a folder; name a file to write the scores to")
        if path.exists() and not force:
            raise QamroError(f"{path}: exists; choose another file or pass --force to "
                             f"replace it")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QamroError(f"{path}: cannot create its folder ({e.strerror or e})") from None
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise QamroError(f"{path}: cannot write in {path.parent} (permission denied)")


def _write_text(path: Path, text: str) -> None:
    """Whole or not at all: an existing file is replaced only once the new one is written."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise QamroError(f"{path}: cannot write ({e.strerror or e})") from None


def score_columns(heads: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """Each head's score, followed by its sd over members where the run has several."""
    spread = any(sd_name(heads[0]) in r for r in rows) if heads else False
    return [c for h in heads for c in ((h, sd_name(h)) if spread else (h,))]


def scores_csv(heads: list[str], rows: list[dict[str, Any]], digits: int = 6) -> str:
    """Header id,<head>[,<head>_sd],..., one line per clip."""
    cols = score_columns(heads, rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", *cols])
    for r in rows:
        w.writerow([r["id"], *(f"{r[c]:.{digits}f}" for c in cols)])
    return buf.getvalue()


def write_scores(path: str | Path, heads: list[str], rows: list[dict[str, Any]]) -> None:
    """CSV (header id,<head>[,<head>_sd],...) or JSON lines, by the file's extension."""
    path = Path(path)
    if path.suffix in (".jsonl", ".ndjson", ".json"):
        _write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return
    _write_text(path, scores_csv(heads, rows))


def write_answer(path: str | Path, heads: list[str], rows: list[dict[str, Any]]) -> None:
    """The AudioMOS 2025 submission format: one line per clip, `id,score,...` in the recipe's
    head order (track 1: id,overall,textual; track 2: id,PQ,PC,CE,CU), no header. An id
    with a comma or a line break would forge another clip's line: such ids are refused."""
    problem = answer_ids_problem(r["id"] for r in rows)
    if problem:
        raise QamroError(f"{path}: {problem}")
    _write_text(Path(path), "".join(",".join([r["id"], *(f"{r[h]:.6f}" for h in heads)])
                                    + "\n" for r in rows))
