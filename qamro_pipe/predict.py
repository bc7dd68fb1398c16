"""Score new audio with a trained run: the run's backbone (as its cache recorded it) embeds the
files into a temporary cache, and the run's heads score them. Bad files are reported one by
one and the others still scored."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from .extract import audio
from .config import ExtractConfig, override
from .extract.datasets import Clip, DatasetRecords, load_dataset
from .errors import DataError, QamroError
from .report.evaluate import TrainedRun, select_members
from .store.reader import read_cache


def _records(files: list[str | Path], manifest: str | Path | None, text: str | None):
    if manifest:
        recs = load_dataset("manifest", manifest)
        if text is not None:
            recs = replace(recs, clips=[replace(c, text=text) for c in recs.clips])
        return recs
    if not files:
        raise QamroError("nothing to score: give audio files or --manifest FILE")
    stems = [Path(f).stem for f in files]
    ids = stems if len(set(stems)) == len(stems) else [str(f) for f in files]
    if len(set(ids)) != len(ids):
        raise QamroError("the same file is given twice")
    clips = [Clip(id=i, path=Path(f), system="", split="predict", labels=(), text=text or "")
             for i, f in zip(ids, files)]
    return DatasetRecords(name="predict", label_names=(), clips=clips)


def _unusable(clip: Clip) -> str | None:
    """Why a file cannot be scored: what extraction refuses (decoding, emptiness, length).
    Silence is scored, as extraction embeds it: a system that outputs silence (a TTS model
    that fails on a prompt) deserves its low score, and leaving the clip out would raise its
    system's mean."""
    try:
        audio.load_audio(clip.path, audio.probe(clip.path).sample_rate, clip.start, clip.end)
    except DataError as e:
        return str(e)
    return None


def predict(run: str | Path, files: list[str | Path] | None = None,
            manifest: str | Path | None = None, text: str | None = None,
            members: str | None = None, **extract_opts):
    """-> (head names, rows [{"id", head: score, head_sd: spread, ...}], failures {id:
    reason}). A score is the mean over the run's members (or those `members` selects, as
    `evaluate --members`); head_sd, their sd (ddof=1), is there when there are several."""
    override(ExtractConfig(), **extract_opts)  # the settings, checked before any work
    tr = TrainedRun(run)
    picked, _ = select_members(tr.config, tr.members, members)
    recs = _records(list(files or []), manifest, text)
    failures = {c.id: why for c in recs.clips if (why := _unusable(c))}
    good = [c for c in recs.clips if c.id not in failures]
    heads = [h.name for h in tr.heads]
    if not good:
        return heads, [], failures
    recs = replace(recs, clips=good, label_range=None)
    saved = (tr.config.get("cache_config") or {}).get("extract", {})
    cfg = override(ExtractConfig(), **{k: v for k, v in saved.items()
                                       if k in ExtractConfig.__dataclass_fields__
                                       and k not in ("device", "workers", "skip_bad")})
    cfg = override(cfg, backbone=tr.backbone.split("@")[0], workers=0, skip_bad=True,
                   **{k: v for k, v in extract_opts.items() if v is not None})
    from .extract.loop import extract

    with tempfile.TemporaryDirectory(prefix="qamro-predict-") as tmp:
        # text features when a head reads them, even for clips without text ("")
        texts = any("text" in h.features for h in tr.heads)
        summary = extract(recs, cfg, Path(tmp) / "predict.h5", progress=False, texts=texts)
        failures.update(summary.skipped)
        cache = read_cache(Path(tmp) / "predict.h5")
        scores = tr.predict(cache)
    rows = []
    for i, cid in enumerate(cache.ids):
        if not cache.usable[i]:
            continue
        row = {"id": str(cid)}
        for h in heads:
            p = scores[h][picked, i]
            v = float(p.mean())
            if not math.isfinite(v):
                failures[str(cid)] = f"{cid}: the heads produced a non-finite score"
                break
            row[h] = v
            if len(p) > 1:
                row[sd_name(h)] = float(p.std(ddof=1))
        else:
            rows.append(row)
    return heads, rows, failures


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


def sd_name(head: str) -> str:
    """The column of a head's spread over members, next to its score."""
    return f"{head}_sd"


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
    head order (track 1: id,overall,textual; track 2: id,PQ,PC,CE,CU), no header."""
    _write_text(Path(path), "".join(",".join([r["id"], *(f"{r[h]:.6f}" for h in heads)])
                                    + "\n" for r in rows))
