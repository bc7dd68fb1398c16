"""`qamro-pipe prefer`: which of two generated clips people prefer, and with what probability
(preference.py), for the pairs of a pairs file (read by pairs_file.py: ours, CMI-RewardBench,
Music Arena and MIREX 2026 field names). Ties are left out of accuracy and calibration and
reported apart. Lyrics and reference audio (CMI-Pref's `lyrics`, `ref-audio-path`) are not
read: no head of this tool reads them."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, QamroError
from .extract.memory import Item
from .pairs_file import FIELDS, WINNERS, Pair, read_pairs  # noqa: F401  (read here too)
from .preference import file_digest, fit_temperature, pair_rows, read_calibration, write_calibration
from .report.evaluate import evaluation_name
from .report.pairs import evaluate_pairs, plot_reliability


def score_pairs(scorer, pairs: list[Pair], head: str | None = None
                ) -> tuple[list[tuple[Pair, dict[str, Any]]], dict[str, str]]:
    """Each pair with its answer (preference.pair_rows), each distinct (clip, prompt) scored
    once; -> (answers, {pair id: why} of pairs with a clip that could not be scored)."""
    if head is not None and head not in scorer.heads:
        raise QamroError(f"--head {head}: this model's heads are {', '.join(scorer.heads)}")
    done, bad = scored_pairs(scorer, pairs)
    answers = pair_rows(scorer, [(a, b) for _, a, b in done], head)
    return [(p, ans) for (p, _, _), ans in zip(done, answers)], bad


def scored_pairs(scorer, pairs: list[Pair]) -> tuple[list[tuple[Pair, dict, dict]],
                                                     dict[str, str]]:
    """Each pair with the score rows of its clips (Scorer.score_items' rows), each distinct
    (clip, prompt) scored once; -> (scored, {pair id: why} of the others)."""
    keys = list(dict.fromkeys((p.audio_a, p.prompt) for p in pairs) |
                dict.fromkeys((p.audio_b, p.prompt) for p in pairs))
    index = {k: str(i) for i, k in enumerate(keys)}
    rows, failures = scorer.score_items([Item(id=index[k], path=k[0], text=k[1])
                                         for k in keys])
    by_id = {r["id"]: r for r in rows}
    done, bad = [], {}
    for p in pairs:
        a, b = index[(p.audio_a, p.prompt)], index[(p.audio_b, p.prompt)]
        if a not in by_id or b not in by_id:
            bad[p.id] = f"pair {p.id}: " + (failures.get(a) or failures.get(b) or "not scored")
            continue
        done.append((p, by_id[a], by_id[b]))
    return done, bad


def calibrate(scorer, pairs_path: str | Path, head: str | None = None) -> dict[str, Any]:
    """Fit each head's temperature on labelled pairs and record it in the scorer's folder
    (preference.json, for its member selection). -> the recorded entry."""
    pairs = read_pairs(pairs_path, labelled=True)
    answers, bad = score_pairs(scorer, pairs, head)
    if bad:
        raise DataError(next(iter(bad.values()))
                        + (f" (and {len(bad) - 1} more pairs)" if len(bad) > 1 else ""))
    decided = [(p, a) for p, a in answers if p.winner != "tie"]
    won = np.array([p.winner == "A" for p, _ in decided])
    temps = {}
    for h in scorer.heads:
        diff = np.array([a[f"{h}_a"] - a[f"{h}_b"] for _, a in decided])
        temps[h] = fit_temperature(diff, won)
    entry = {"temperature": temps, "pairs": len(decided), "ties_left_out": len(answers)
             - len(decided), "file": Path(pairs_path).name,
             "sha256": file_digest(Path(pairs_path))}
    write_calibration(scorer.folder, scorer.selection, entry)
    return entry


def answer_lines(answers: list[tuple[Pair, dict[str, Any]]]) -> str:
    """One JSON object per pair: id, preferred, P(A over B) per head, the scores, how the
    temperature was set."""
    return "".join(json.dumps({"id": p.id, **a}) + "\n" for p, a in answers)


def evaluate_pairs_file(scorer, pairs_path: str | Path, n_boot: int = 1000,
                        head: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Score labelled pairs and write MODEL/evaluations/pairs-STEM-DIGEST[-MEMBERS]/:
    metrics.json (per head: accuracy, ECE, Brier with bootstrap intervals; ties apart),
    answers.jsonl and reliability-HEAD.png. -> (that folder, the metrics)"""
    pairs_path = Path(pairs_path)
    pairs = read_pairs(pairs_path, labelled=True)
    answers, bad = score_pairs(scorer, pairs, head)
    if not answers:
        raise DataError(f"{pairs_path}: no pair could be scored ("
                        + next(iter(bad.values()), "none") + ")")
    fitted = read_calibration(scorer.folder, scorer.selection)
    digest = file_digest(pairs_path)
    warnings = [f"{len(bad)} pair(s) left out: a clip could not be scored (first: "
                f"{next(iter(bad.values()))})"] if bad else []
    if fitted and fitted.get("sha256") == digest:
        warnings.append("the temperature was fitted on these very pairs: their calibration "
                        "figures are not a held-out estimate")
    winners = [p.winner for p, _ in answers]
    metrics: dict[str, Any] = {"model": str(scorer.folder), "pairs_file": str(pairs_path),
                               "pairs_sha256": digest, "members": scorer.members,
                               "selection": scorer.selection,
                               "calibration": answers[0][1]["calibration"],
                               "warnings": warnings, "heads": {}}
    name = "pairs-" + evaluation_name(pairs_path, "x", scorer.selection).replace("-x", "", 1)
    out = scorer.folder / "evaluations" / name
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for h in scorer.heads:
        figs = evaluate_pairs(np.array([a[f"p_{h}"] for _, a in answers]), winners, n_boot)
        stem = "reliability-" + re.sub(r"[^A-Za-z0-9._-]", "_", h)
        plot_reliability(tmp / f"{stem}.png", figs, h, f"{pairs_path.name}, "
                         f"{metrics['calibration']}")
        metrics["heads"][h] = {**figs, "picture": f"{stem}.png"}
    (tmp / "answers.jsonl").write_text("".join(
        json.dumps({"id": p.id, "winner": p.winner, **a}) + "\n" for p, a in answers))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if out.exists():  # this model's own earlier evaluation of the same file and members
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out, metrics
