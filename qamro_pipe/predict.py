"""Score new audio with a trained run: the run's backbone (as its cache recorded it) embeds the
files into a temporary cache, and the run's heads score them. A run whose heads read features
from several caches has each of their backbones embed the files, as each cache recorded its
own settings, and the temporary caches are joined as the run's were. Bad files are reported
one by one and the others still scored."""
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
from .untrusted import answer_ids_problem
from .report.evaluate import TrainedRun, select_members


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
            members: str | None = None, answer: bool = False, **extract_opts):
    """-> (head names, rows [{"id", head: score, head_sd: spread, ...}], failures {id:
    reason}). A score is the mean over the run's members (or those `members` selects, as
    `evaluate --members`); head_sd, their sd (ddof=1), is there when there are several.
    `answer`: the rows go to an answer file, so ids it cannot carry are refused first."""
    override(ExtractConfig(), **extract_opts)  # the settings, checked before any work
    tr = TrainedRun(run)
    picked, _ = select_members(tr.config, tr.members, members)
    recs = _records(list(files or []), manifest, text)
    problem = answer and answer_ids_problem(c.id for c in recs.clips)
    if problem:  # before any audio is decoded or the backbone loaded
        raise QamroError(f"--answer: {problem}")
    failures = {c.id: why for c in recs.clips if (why := _unusable(c))}
    good = [c for c in recs.clips if c.id not in failures]
    heads = [h.name for h in tr.heads]
    if not good:
        return heads, [], failures
    recs = replace(recs, clips=good, label_range=None)
    with tempfile.TemporaryDirectory(prefix="qamro-predict-") as tmp:
        made = _embed(tr, recs, Path(tmp), {k: v for k, v in extract_opts.items()
                                            if v is not None}, failures)
        cache, _ = tr.open_cache(made.pop(None), made)
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


def _embed(tr: TrainedRun, recs: DatasetRecords, tmp: Path, opts: dict[str, Any],
           failures: dict[str, str]) -> dict[str | None, Path]:
    """Each cache the run read, made anew for these clips by its own backbone and settings:
    {None: the run's cache's, name: each other cache's}. `opts` apply to every backbone but
    --checkpoint, which names the run's own backbone's weights. Skipped clips go to
    `failures`."""
    from .extract.loop import extract
    from .train.joined import split_feature

    own = [f for h in tr.heads for f in h.features if split_feature(f)[0] is None]
    todo = [(None, tr.config.get("cache_config"), tr.backbone, own, opts)]
    todo += [(name, s.get("cache_config"), s["backbone"], s["features"],
              {k: v for k, v in opts.items() if k != "checkpoint"})
             for name, s in tr.sources.items()]
    made = {}
    for i, (name, saved, backbone, feats, given) in enumerate(todo):
        made[name] = tmp / f"predict-{i}.h5"
        summary = extract(recs, _extract_config(saved, backbone, given), made[name],
                          progress=False, texts=_reads_text(backbone, feats))
        failures.update(summary.skipped)
    return made


def _extract_config(saved: dict[str, Any] | None, backbone: str,
                    opts: dict[str, Any]) -> ExtractConfig:
    """The settings a cache recorded for extraction (not where or how fast it ran), for its
    backbone, with the options given to predict."""
    saved = (saved or {}).get("extract", {})
    cfg = override(ExtractConfig(), **{k: v for k, v in saved.items()
                                       if k in ExtractConfig.__dataclass_fields__
                                       and k not in ("device", "workers", "skip_bad")})
    return override(cfg, backbone=backbone.split("@")[0], workers=0, skip_bad=True, **opts)


def _reads_text(backbone: str, features) -> bool:
    """Whether the run reads text features of this backbone: they are made even for clips
    without text ("")."""
    from .extract.backbones import get_backbone

    specs = get_backbone(backbone.split("@")[0]).feature_specs()
    return any(specs[f].text for f in features if f in specs)


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
    head order (track 1: id,overall,textual; track 2: id,PQ,PC,CE,CU), no header. An id
    with a comma or a line break would forge another clip's line: such ids are refused."""
    problem = answer_ids_problem(r["id"] for r in rows)
    if problem:
        raise QamroError(f"{path}: {problem}")
    _write_text(Path(path), "".join(",".join([r["id"], *(f"{r[h]:.6f}" for h in heads)])
                                    + "\n" for r in rows))
