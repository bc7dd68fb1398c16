"""What the CLI needs of stage 1 besides `extract`: its dataset choice -> records, and the
summary it prints."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import cache_root, check_label_range
from ..errors import QamroError
from .datasets import DatasetRecords, load_dataset
from .loop import ExtractSummary


def records_for(dataset: str | None, root: str | Path | None, manifest: str | Path | None,
                splits: str | None = None, eval_dir: str | Path | None = None,
                lists: str | Path | None = None,
                label_range: str | None = None) -> DatasetRecords:
    """The CLI's dataset choice -> records. `label_range` "LO,HI": a manifest's scale."""
    if label_range is not None and not manifest:
        raise QamroError("--label-range applies to --manifest (the published data sets "
                         "declare their own scale)")
    if manifest:
        return load_dataset("manifest", manifest,
                            label_range=parse_label_range(label_range))
    if not dataset:
        raise QamroError("say what to extract: --dataset NAME --root DIR, or --manifest FILE")
    if dataset == "demo":
        return load_dataset("demo", root or (cache_root() / "demo-corpus"))
    if root is None:
        raise QamroError(f"--dataset {dataset} needs --root (the dataset's folder)")
    opts: dict[str, Any] = {}
    for flag, name, value, takes in (("--splits", "splits", splits, ("musiceval", "aes-natural")),
                                     ("--eval-dir", "eval_dir", eval_dir,
                                      ("musiceval", "aes-natural")),
                                     ("--lists", "lists", lists, ("aes-natural",))):
        if value is not None and dataset not in takes:
            raise QamroError(f"{flag} applies to --dataset {' or '.join(takes)}")
        if value is not None:
            opts[name] = tuple(value.split(",")) if name == "splits" else value
    return load_dataset(dataset, root, **opts)


def parse_label_range(text: str | None) -> tuple[float, float] | None:
    """--label-range "LO,HI" -> (lo, hi), checked; None when not given."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise QamroError(f"--label-range {text!r}: give the scale as two numbers LO,HI, "
                         f"e.g. 1,5") from None
    check_label_range((lo, hi), "--label-range")
    return lo, hi


def summary_text(s: ExtractSummary) -> str:
    if s.status == "nothing to do":
        return f"{s.path}: already complete ({s.total} clips); nothing to do"
    update = "; ".join(([f"kept {s.kept} clips of the earlier cache"] if s.kept else [])
                       + s.changes)
    if s.status == "rewritten":
        text = f"{s.path}: nothing to embed ({s.total} clips); {update}"
    else:
        rate = s.written / s.seconds if s.seconds else 0.0
        text = (f"{s.path}: {s.written} clips extracted in {s.seconds:.1f} s ({rate:.1f} "
                f"clips/s; model load {s.load_seconds:.1f} s)"
                + (f", {s.done_before} were already done" if s.done_before else "")
                + (f"\n{update}" if update else ""))
    if s.skipped:
        text += f"\nskipped {len(s.skipped)} bad file(s):\n" + "\n".join(
            f"  {v}" for v in s.skipped.values())
    return text
