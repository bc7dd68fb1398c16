"""Per-system anchor recalibration: a trained model meets a new system's clips, whose scores
may be off by a constant, and a few labelled pairs comparing them with clips of systems the
model knows (the anchors) fit that constant.

For each pair of a clip of the new system (score s_new) and an anchor clip (s_anchor), with
o = 1 when the new system's clip won, 0 when it lost and 1/2 for a tie, the offset b of each
head maximises the Bradley-Terry likelihood

    P(new over anchor) = sigmoid((s_new + b - s_anchor) / T)
    b = argmax_b sum [ o log P + (1 - o) log (1 - P) ]

with T as `prefer` sets it (preference.py: the fitted temperature where MODEL/preference.json
has one, else the members' spread). The anchors' scores are taken as they are: they are the
scale b is measured on (TuneJury's anchor calibration pins an in-distribution system at 0
likewise: yonghyunk1m/TuneJury, applications/anchor_calibration/fit.py, which fits every
system's intercept with an L2 penalty; here one system at a time, without a penalty). b's
95% interval: percentiles of b refitted on N_BOOT resamples of the pairs. The pairs file
says which system made each clip (`system_a`, `system_b`); pairs without the new system, or
with it on both sides, take no part.

The offsets are recorded in MODEL/system_offsets.json (per member selection, per system, per
head), and `Scorer.score(..., system=NAME)` adds them. Refitting a system keeps the earlier
file whole as system_offsets.json.kept-N first; a file of that name that this tool did not
write is refused, never overwritten."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, QamroError
from .pairs import scored_pairs
from .pairs_file import Pair, read_pairs
from .preference import file_digest, pair_temperatures

OFFSETS_FILE = "system_offsets.json"
MARK = "qamro_system_offsets"  # what tells our file from another's
N_BOOT = 1000
MIN_PAIRS = 5  # fewer pairs of the system than this fit nothing worth recording
OUTCOME_NEW = {"A": (1.0, 0.0), "B": (0.0, 1.0), "tie": (0.5, 0.5)}  # o for the clip (A, B)


def fit_offset(diff: np.ndarray, outcome: np.ndarray, temp: np.ndarray, bound: float) -> float:
    """The b maximising the likelihood of the outcomes given s_new - s_anchor = `diff`."""
    from scipy.optimize import minimize_scalar

    def nll(b: float) -> float:
        z = (diff + b) / temp
        return float(np.sum(outcome * np.logaddexp(0.0, -z)
                            + (1.0 - outcome) * np.logaddexp(0.0, z)))

    return float(minimize_scalar(nll, bounds=(-bound, bound), method="bounded",
                                 options={"xatol": 1e-7}).x)


def offset_with_interval(diff, outcome, temp, n_boot: int = N_BOOT, seed: int = 0
                         ) -> dict[str, Any]:
    """b and its bootstrap 95% interval (resampling the pairs)."""
    diff, outcome, temp = (np.asarray(v, np.float64) for v in (diff, outcome, temp))
    bound = 10.0 * (float(np.max(np.abs(diff))) + float(np.median(temp)))
    b = fit_offset(diff, outcome, temp, bound)
    rng = np.random.default_rng(seed)
    n = len(diff)
    boots = [fit_offset(diff[i], outcome[i], temp[i], bound)
             for i in (rng.integers(0, n, n) for _ in range(n_boot))]
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (math.nan, math.nan)
    return {"offset": b, "interval": [float(lo), float(hi)], "resamples": n_boot}


def system_pairs(pairs: list[Pair], system: str, where: Path) -> list[tuple[Pair, int]]:
    """(pair, side of the new system's clip: 0 = A, 1 = B) of the pairs comparing `system`
    with another system."""
    missing = [p.id for p in pairs if p.system_a is None or p.system_b is None]
    if missing:
        raise DataError(f"{where} pair {missing[0]}: recalibration needs each clip's system "
                        f"(system_a, system_b)")
    out = [(p, 0 if p.system_a == system else 1) for p in pairs
           if (p.system_a == system) != (p.system_b == system)]
    if len(out) < MIN_PAIRS:
        raise DataError(f"{where}: {len(out)} pair(s) compare system {system!r} with another "
                        f"system; recalibration needs at least {MIN_PAIRS}")
    return out


def recalibrate(scorer, pairs_path: str | Path, system: str, n_boot: int = N_BOOT,
                record: bool = True) -> dict[str, Any]:
    """Fit `system`'s offset on every head from the labelled pairs of `pairs_path` and record
    it in the scorer's folder (module docstring). -> {head: {"offset", "interval", ...}}."""
    pairs_path = Path(pairs_path)
    chosen = system_pairs(read_pairs(pairs_path, labelled=True), system, pairs_path)
    side = {p.id: s for p, s in chosen}
    done, bad = scored_pairs(scorer, [p for p, _ in chosen])
    if bad:
        raise DataError(next(iter(bad.values()))
                        + (f" (and {len(bad) - 1} more pairs)" if len(bad) > 1 else ""))
    # each pair as (the new system's clip, the anchor's clip)
    new_anchor = [(a, b) if side[p.id] == 0 else (b, a) for p, a, b in done]
    outcome = np.array([OUTCOME_NEW[p.winner][side[p.id]] for p, _, _ in done])
    if len(set(outcome)) == 1 and outcome[0] != 0.5:
        raise DataError(f"{pairs_path}: system {system!r} {'won' if outcome[0] else 'lost'} "
                        f"every one of its {len(outcome)} pairs: no finite offset fits that "
                        f"(give pairs it both wins and loses)")
    result = {}
    for h in scorer.heads:
        diff = np.array([new[h] - anchor[h] for new, anchor in new_anchor])
        temp, how = pair_temperatures(scorer, new_anchor, h)
        result[h] = {**offset_with_interval(diff, outcome, temp, n_boot),
                     "pairs": len(outcome), "ties": int(np.sum(outcome == 0.5)),
                     "won": int(np.sum(outcome == 1.0)), "temperature": how,
                     "file": pairs_path.name, "sha256": file_digest(pairs_path)}
    if record:
        write_offsets(scorer.folder, scorer.selection, system, result)
    return result


def read_offsets(folder: Path, selection: str | None) -> dict[str, Any]:
    """{system: {head: entry}} recorded for this model folder and member selection."""
    path = Path(folder) / OFFSETS_FILE
    if not path.is_file():
        return {}
    return _ours(path)["by_members"].get(selection or "all", {})


def _ours(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise QamroError(f"{path}: not readable as the system offsets this tool writes "
                         f"({e}); move it away to record offsets") from None
    if not isinstance(data, dict) or data.get(MARK) != 1 or \
            not isinstance(data.get("by_members"), dict):
        raise QamroError(f"{path}: not a system offsets file of this tool; move it away to "
                         f"record offsets (it is left as it is)")
    return data


def write_offsets(folder: Path, selection: str | None, system: str,
                  entry: dict[str, Any]) -> tuple[Path, Path | None]:
    """Record `system`'s offsets for this selection, keeping the others; where the system
    had some already, the earlier file is kept whole as OFFSETS_FILE.kept-N first.
    -> (the file, the kept copy or None)."""
    path = Path(folder) / OFFSETS_FILE
    data: dict[str, Any] = {MARK: 1, "by_members": {}}
    kept = None
    if path.exists():
        data = _ours(path)
        if system in data["by_members"].get(selection or "all", {}):
            n = 1
            while path.with_name(f"{path.name}.kept-{n}").exists():
                n += 1
            kept = path.with_name(f"{path.name}.kept-{n}")
            shutil.copy2(path, kept)
    data["by_members"].setdefault(selection or "all", {})[system] = entry
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path, kept


def apply_offsets(rows: list[dict[str, Any]], offsets: dict[str, Any]) -> None:
    """Add a system's recorded offset to each head's score of `rows` (in place)."""
    for row in rows:
        for h, e in offsets.items():
            if h in row:
                row[h] = row[h] + e["offset"]
