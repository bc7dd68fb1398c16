"""Run folders: what a training run leaves behind, written all at once or not at all.

A run is assembled in a sibling folder `.NAME.partial-PID` and renamed into place when
complete, so a folder named NAME is always a whole run; a killed run leaves only the
clearly named partial folder. Contents: config.json, metrics.json, predictions.csv,
heads.safetensors (read with safetensors, never pickle)."""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import TrainConfig, to_jsonable
from .errors import QamroError
from .metrics import FIGURES, evaluate
from .store import Cache
from .train import TrainResult

RUN_VERSION = 1


def versions() -> dict[str, str]:
    return {"qamro-pipe": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def member_metrics(cache: Cache, result: TrainResult, k: int, rows: np.ndarray,
                   n_boot: int) -> dict[str, Any]:
    out = {}
    for h in result.heads:
        col = cache.label_names.index(h.label)
        mos = {s: float(v[col]) for s, v in cache.system_mos.items()} or None
        out[h.name] = evaluate(cache.labels[rows, col], result.predictions[h.name][k, rows],
                               cache.systems[rows], mos, n_boot,
                               what=f"{cache.path} head {h.name!r}")
    return out


def summarise(cache: Cache, result: TrainResult, cfg: TrainConfig) -> dict[str, Any]:
    """metrics.json: per member, and per head the mean (and spread) over usable members."""
    rows = result.split.eval
    ok = [k for k in range(len(result.members)) if k not in result.failures]
    if not ok:
        raise QamroError("every member failed: " + "; ".join(result.failures.values()))
    members = []
    for k, m in enumerate(result.members):
        entry = {"member": m.label(), "seed": m.seed, "loss": to_jsonable(m.loss),
                 "best_epoch": result.best_epoch[k], "stopped_epoch": result.stopped_epoch[k],
                 "best_val_loss": result.best_val_loss[k] if k in ok else None}
        if k in result.failures:
            entry["failed"] = result.failures[k]
        else:
            entry["heads"] = member_metrics(cache, result, k, rows, cfg.bootstrap)
            if k in result.warnings:
                entry["warning"] = result.warnings[k]
        members.append(entry)
    heads = {}
    for h in result.heads:
        heads[h.name] = {}
        for level in ("system", "utterance"):
            per = [members[k]["heads"][h.name][level] for k in ok]
            agg = dict(per[0]) if len(per) == 1 else {}
            if len(per) > 1:
                for fig in FIGURES:
                    vals = [p[fig] for p in per if p.get(fig) is not None]
                    agg[fig] = float(np.mean(vals)) if vals else None
                    agg[f"{fig}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
                agg["n_members"] = len(per)
            heads[h.name][level] = agg
    return {"eval_split": cfg.eval_split, "validation": result.split.val_source,
            "heads": heads, "members": members}


def write_predictions(path: Path, cache: Cache, result: TrainResult) -> None:
    ok = [k for k in range(len(result.members)) if k not in result.failures]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        header = ["id", "system", "split"]
        for h in result.heads:
            header += [f"true_{h.name}", f"pred_{h.name}"]
            if len(ok) > 1:
                header += [f"pred_{h.name}_m{k}" for k in ok]
        w.writerow(header)
        cols = {h.name: cache.label_names.index(h.label) for h in result.heads}
        for i in range(len(cache.ids)):
            if cache.usable is not None and not cache.usable[i]:
                continue
            row = [cache.ids[i], cache.systems[i], cache.splits[i]]
            for h in result.heads:
                p = result.predictions[h.name][ok, i]
                true = cache.labels[i, cols[h.name]]
                row += ["" if np.isnan(true) else f"{true:.6g}", f"{p.mean():.6g}"]
                if len(ok) > 1:
                    row += [f"{v:.6g}" for v in p]
            w.writerow(row)


def save_run(out: Path, *, config: dict[str, Any], metrics: dict[str, Any], cache: Cache,
             result: TrainResult, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise QamroError(f"{out}: run folder exists; choose another --out or pass --force "
                         f"to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions(tmp / "predictions.csv", cache, result)
    tensors = {f"{h}/m{k}/{name}": t for h, states in result.states.items()
               for k, state in enumerate(states) if k not in result.failures
               for name, t in state.items()}
    save_file(tensors, str(tmp / "heads.safetensors"),
              metadata={"qamro_run_version": str(RUN_VERSION)})
    if out.exists():  # --force: swap in the new run, then drop the old one
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def load_run(run: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the heads of a finished run, refused if from another schema."""
    run = Path(run)
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise QamroError(f"{run}: not a run folder (no config.json)")
    config = json.loads(cfg_path.read_text())
    if config.get("qamro_run_version") != RUN_VERSION:
        raise QamroError(f"{run}: run folder version {config.get('qamro_run_version')!r}, this "
                         f"qamro-pipe reads version {RUN_VERSION}")
    return config, load_file(str(run / "heads.safetensors"))
