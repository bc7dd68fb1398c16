"""A versus B: P(A preferred over B) from two clips' scores, a Bradley-Terry link on the
score difference (docs/preference.md).

    P(A over B) = sigmoid((s_A - s_B) / T)        per head

T, the temperature, is fitted on labelled pairs (`fit_temperature`: maximum likelihood, ties
left out) and recorded in the model folder as preference.json, with the member selection it
was fitted for. Without one, the members' spread sets it per pair: the difference of two
scores whose members disagree by sd_A and sd_B is uncertain by sd_d = sqrt(sd_A^2 + sd_B^2),
and the logistic with the same spread as a normal of sd sd_d has T = sd_d * sqrt(3) / pi. A
model of one member has no spread; its run's utterance-level RMSE on the eval split stands in
for each score's uncertainty (sd_d = sqrt(2) * RMSE)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QamroError

CALIBRATION_FILE = "preference.json"
LOGISTIC_SD = math.sqrt(3) / math.pi  # T per unit sd: a logistic of scale T has sd T*pi/sqrt(3)
MIN_T = 1e-6  # below this a temperature is a step: no probability left to calibrate


def p_a_over_b(score_a, score_b, temperature) -> np.ndarray:
    d = np.asarray(score_a, np.float64) - np.asarray(score_b, np.float64)
    t = np.maximum(np.asarray(temperature, np.float64), MIN_T)
    return 1.0 / (1.0 + np.exp(-d / t))


def spread_temperature(sd_a, sd_b, rmse: float | None) -> np.ndarray:
    """T from the members' spread (module docstring); `rmse` where there is one member."""
    sd_a, sd_b = np.asarray(sd_a, np.float64), np.asarray(sd_b, np.float64)
    sd_d = np.sqrt(sd_a ** 2 + sd_b ** 2)
    if rmse is not None:
        sd_d = np.where(sd_d > 0, sd_d, math.sqrt(2) * rmse)
    return np.maximum(sd_d * LOGISTIC_SD, MIN_T)


def fit_temperature(diff: np.ndarray, a_won: np.ndarray) -> float:
    """The T maximising the Bradley-Terry likelihood of the labelled pairs (score
    differences `diff`, `a_won` True where A was preferred; ties already left out): a
    logistic regression of the winner on the difference, without intercept, w = 1/T."""
    from scipy.optimize import minimize_scalar

    diff, y = np.asarray(diff, np.float64), np.where(np.asarray(a_won, bool), 1.0, -1.0)
    if len(diff) < 2 or not np.any(diff):
        raise QamroError(f"calibration needs at least 2 labelled pairs with different scores "
                         f"(got {len(diff)})")
    if np.mean(y * diff) <= 0:
        raise QamroError("calibration: the scores do not predict these labels (the preferred "
                         "clip scores lower on average): no temperature makes P(A over B) "
                         "agree with them; check the pairs file's winner field")

    def nll(log_w: float) -> float:
        return float(np.logaddexp(0.0, -y * diff * math.exp(log_w)).sum())

    scale = float(np.std(diff)) or 1.0
    lo, hi = math.log(1e-3 / scale), math.log(1e4 / scale)
    w = math.exp(minimize_scalar(nll, bounds=(lo, hi), method="bounded").x)
    return 1.0 / w


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_calibration(folder: Path, selection: str | None) -> dict[str, Any] | None:
    """The temperatures fitted for this model folder (or run) and member selection, if any."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise QamroError(f"{path}: not valid JSON ({e}); refit it with --calibrate") from None
    return data.get("by_members", {}).get(selection or "all")


def write_calibration(folder: Path, selection: str | None, entry: dict[str, Any]) -> Path:
    """Record `entry` ({"temperature": {head: T}, "pairs": ..., ...}) for this selection,
    keeping the others; written whole (a new file renamed over the old)."""
    path = Path(folder) / CALIBRATION_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("by_members", {})[selection or "all"] = entry
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def pair_rows(scorer, pairs: list[tuple[dict, dict]], head: str | None = None
              ) -> list[dict[str, Any]]:
    """For scored pairs (row of A, row of B): {"preferred", "p_HEAD", "HEAD_a", "HEAD_b",
    "calibration"}. `preferred` follows `head` (the first by default); equal scores prefer B,
    as CMI-RewardBench's harness labels them."""
    heads = scorer.heads
    head = head or heads[0]
    if head not in heads:
        raise QamroError(f"--head {head}: this model's heads are {', '.join(heads)}")
    fitted = read_calibration(scorer.folder, scorer.selection)
    rmse = _rmse(scorer) if scorer.members == 1 and not fitted else {}
    out = []
    for a, b in pairs:
        row: dict[str, Any] = {}
        for h in heads:
            if fitted:
                t = fitted["temperature"][h]
            else:
                t = float(spread_temperature(a.get(f"{h}_sd", 0.0), b.get(f"{h}_sd", 0.0),
                                             rmse.get(h)))
            row[f"p_{h}"] = float(p_a_over_b(a[h], b[h], t))
            row[f"{h}_a"], row[f"{h}_b"] = a[h], b[h]
        row["preferred"] = "A" if a[head] > b[head] else "B"
        row["calibration"] = calibration_text(fitted)
        out.append({"preferred": row.pop("preferred"), **row})
    return out


def pair_temperatures(scorer, pairs: list[tuple[dict, dict]], head: str
                      ) -> tuple[np.ndarray, str]:
    """[n] the temperature `prefer` uses for each scored pair (row of A, row of B) on
    `head`: the fitted one where preference.json has it, else the members' spread; and how
    it was set (calibration_text)."""
    fitted = read_calibration(scorer.folder, scorer.selection)
    if fitted:
        return np.full(len(pairs), float(fitted["temperature"][head])), calibration_text(fitted)
    rmse = _rmse(scorer).get(head) if scorer.members == 1 else None
    sd = np.array([[a.get(f"{head}_sd", 0.0), b.get(f"{head}_sd", 0.0)] for a, b in pairs],
                  np.float64).reshape(-1, 2)
    return spread_temperature(sd[:, 0], sd[:, 1], rmse), calibration_text(None)


def calibration_text(fitted: dict[str, Any] | None) -> str:
    if fitted:
        return (f"temperature fitted on {fitted['pairs']} labelled pairs of "
                f"{fitted['file']}")
    return "uncalibrated: temperature from the members' spread (fit one with --calibrate)"


def _rmse(scorer) -> dict[str, float]:
    """Each head's utterance-level RMSE on the run's eval split (its metrics), for a model of
    one member, whose scores have no spread."""
    heads: dict[str, Any] = {}
    run_metrics, model_config = scorer.folder / "metrics.json", scorer.folder / "config.json"
    if run_metrics.is_file():
        heads = json.loads(run_metrics.read_text()).get("heads", {})
    elif model_config.is_file():
        heads = json.loads(model_config.read_text()).get("metrics", {}).get("heads", {})
    out = {}
    for h in scorer.heads:
        mse = ((heads or {}).get(h, {}).get("utterance") or {}).get("mse")
        out[h] = math.sqrt(mse) if mse else 1.0
    return out
