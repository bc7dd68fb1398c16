"""Run folders: what a training run leaves behind, written all at once or not at all.

A run is assembled in a sibling folder `.NAME.partial-PID` and renamed into place when
complete, so a folder named NAME is always a whole run; a killed run leaves only the
clearly named partial folder, which the next run to NAME removes (clean_stale). Nothing
non-finite is written: metrics, predictions and heads are checked first. Contents:
config.json, metrics.json, predictions.csv, heads.safetensors (read with safetensors, never
pickle), history.csv (the loss per member and epoch), and whatever the experiment adds
(curves, a sweep's table and plot) before it is published. --force replaces only a folder
this tool wrote (check_out)."""
from __future__ import annotations

import csv
import json
import os
import platform
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .. import __version__
from ..checkpoints import save_safetensors
from ..config import TrainConfig, to_jsonable
from ..errors import QamroError
from ..metrics import FIGURES, TOP_FIGURES, evaluate, mean_sd
from ..store.durable import fault_point, fsync_path, pid_alive
from ..store.reader import Cache
from .run_check import check_config
from .state import HISTORY_COLUMNS
from .trainer import TrainResult

RUN_VERSION = 1
RUN_FILES = ("config.json", "metrics.json", "predictions.csv", "heads.safetensors")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|replaced)-(?P<pid>\d+)$")


def versions() -> dict[str, str]:
    return {"qamro-pipe": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def head_metrics(cache: Cache, heads, preds: dict[str, np.ndarray], rows: np.ndarray,
                 n_boot: int, what: str = "", cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Per head, utterance- and system-level figures of `preds[head]` ([N] scores) on `rows`,
    against the published system MOS where the cache has one; the top tier at `cfg`'s
    top_tier and top_k (TrainConfig's defaults when None)."""
    cfg = cfg or TrainConfig()
    out = {}
    for h in heads:
        col = cache.label_names.index(h.label)
        mos = {s: float(v[col]) for s, v in cache.system_mos.items()} or None
        out[h.name] = evaluate(cache.labels[rows, col], preds[h.name][rows],
                               cache.systems[rows], mos, n_boot,
                               what=f"{cache.path} head {h.name!r}{what}",
                               top_tier=cfg.top_tier, top_k=cfg.top_k)
    return out


def summarise(cache: Cache, result: TrainResult, cfg: TrainConfig) -> dict[str, Any]:
    """metrics.json: per member, and per head the mean (and spread) over usable members."""
    rows = result.split.eval
    ok = result.usable
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
            entry["heads"] = head_metrics(cache, result.heads,
                                          {h: p[k] for h, p in result.predictions.items()},
                                          rows, cfg.bootstrap, cfg=cfg)
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
                for fig in (*FIGURES, *TOP_FIGURES):
                    agg[fig], agg[f"{fig}_std"] = mean_sd(p.get(fig) for p in per)
                agg["n_members"] = len(per)
            heads[h.name][level] = agg
    return {"eval_split": cfg.eval_split, "validation": result.split.val_source,
            "heads": heads, "members": members}


def write_predictions(path: Path, cache: Cache, heads, preds: dict[str, np.ndarray],
                      rows: np.ndarray, members: list[int] | None = None,
                      columns: dict[str, np.ndarray] | None = None) -> None:
    """id, system, split, any further `columns` ({name: [N] values}, e.g. a clip's fold),
    then per head the true score, the mean prediction over members (preds[head] is
    [members, N]) and, with several members, their sd (ddof=1, as the tables' sd over seeds)
    and each member's prediction (columns named by `members`, the members' indices in the
    run). The mean and sd are over every member given: for a sweep, every setting and seed."""
    columns = columns or {}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        header = ["id", "system", "split", *columns]
        for h in heads:
            header += [f"true_{h.name}", f"pred_{h.name}"]
            if len(preds[h.name]) > 1:
                header += [f"sd_{h.name}", *(f"pred_{h.name}_m{k}"
                                             for k in (members or range(len(preds[h.name]))))]
        w.writerow(header)
        cols = {h.name: cache.label_names.index(h.label) if h.label in cache.label_names
                else None for h in heads}  # None: an unlabelled cache (evaluate)
        for i in rows:
            row = [cache.ids[i], cache.systems[i], cache.splits[i],
                   *(values[i] for values in columns.values())]
            for h in heads:
                p = preds[h.name][:, i]
                true = np.nan if cols[h.name] is None else cache.labels[i, cols[h.name]]
                row += ["" if np.isnan(true) else f"{true:.6g}", f"{p.mean():.6g}"]
                if len(p) > 1:
                    row += [f"{p.std(ddof=1):.6g}", *(f"{v:.6g}" for v in p)]
            w.writerow(row)


def write_history(path: Path, history: np.ndarray) -> None:
    """history.csv: one row per member and epoch trained (member = index in config.json's
    members), the objective and its parts, train and validation (state.HISTORY_COLUMNS)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["member", "epoch", *HISTORY_COLUMNS])
        for row in history:
            w.writerow([int(row[0]), int(row[1]), *(f"{v:.6g}" for v in row[2:])])


def is_run_folder(path: Path) -> bool:
    """Whether `path` is a folder this tool wrote: its config.json carries qamro_run_version."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(config, dict) and "qamro_run_version" in config


def check_out(out: Path, force: bool, cache: Path | None = None) -> None:
    """Refuse, before any work, a run folder `out` that would replace something the tool did
    not make: the working directory, the input cache, a file, a folder of anything else. A run
    folder the tool wrote is replaced only with --force; an empty folder is simply used."""
    where = out.resolve()
    here = Path.cwd().resolve()
    if where == here or where in here.parents:
        raise QamroError(f"--out {out}: that is the working directory or a folder holding it; "
                         f"name a new folder for the run")
    if cache is not None and where == Path(cache).resolve():
        raise QamroError(f"--out {out}: that is the cache this run trains from; name a new "
                         f"folder for the run")
    parent = where.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise QamroError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QamroError(f"--out {out}: cannot write in {parent} (permission denied)")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise QamroError(f"--out {out}: a file is there, not a run folder; refusing to "
                         f"replace it{' even with --force' if force else ''}")
    if not any(out.iterdir()):
        return
    if not is_run_folder(out):
        raise QamroError(f"--out {out}: a folder qamro-pipe did not write (no config.json with "
                         f"qamro_run_version); refusing to replace it"
                         f"{' even with --force' if force else ''}; choose another --out")
    if not force:
        raise QamroError(f"{out}: run folder exists; choose another --out or pass --force to "
                         f"replace it")


def json_text(what: str, obj: Any) -> str:
    try:
        return json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise QamroError(f"{what} contains NaN or inf; not writing a run with it") from None




def clean_stale(out: str | Path) -> list[str]:
    """Tidy what killed runs left beside run folder `out`, and say what was done.

    `.NAME.partial-PID` of a dead process is an unfinished run: removed. A kill between the
    two renames of --force leaves no NAME, the old run in `.NAME.replaced-PID` and the new,
    complete one in `.NAME.partial-PID`: the swap is finished. Folders of live processes are
    left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    by_pid: dict[int, dict[str, Path]] = {}
    for p in out.parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and m["name"] == out.name and int(m["pid"]) != os.getpid() \
                and not pid_alive(int(m["pid"])):
            by_pid.setdefault(int(m["pid"]), {})[m["kind"]] = p
    notes = []
    for pid, left in sorted(by_pid.items()):
        if "replaced" in left and not out.exists():
            done = left.pop("partial", None) or left.pop("replaced")
            os.replace(done, out)
            notes.append(f"{out}: finished the replacement that process {pid} was killed in")
        for p in left.values():
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"{out}: removed {p.name}, left by killed process {pid}")
    return notes


def _check_finite_outputs(result: TrainResult, cache: Cache, tensors: dict) -> None:
    ok = result.usable
    rows = np.flatnonzero(cache.usable) if cache.usable is not None else slice(None)
    for h, pred in result.predictions.items():
        if not np.isfinite(pred[ok][:, rows]).all():
            raise QamroError(f"head {h!r}: predictions contain NaN or inf; not writing them")
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise QamroError(f"{name}: weights contain NaN or inf; not writing them")


def stage_run_folder(out: Path, *, config: dict[str, Any], metrics: dict[str, Any],
                     cache: Cache, result: TrainResult, force: bool = False) -> Path:
    """Assemble run folder `out`'s files in its staging folder and return that folder; the
    caller adds what else belongs in the run (curves, a table) and then `publish`es it, so
    the name `out` only ever shows a whole run."""
    out = Path(out)
    clean_stale(out)
    check_out(out, force)
    tensors = {f"{h}/m{k}/{name}": t for h, states in result.states.items()
               for k, state in enumerate(states) if k not in result.failures
               for name, t in state.items()}
    _check_finite_outputs(result, cache, tensors)
    config_text, metrics_text = json_text("config", config), json_text("metrics", metrics)
    tmp = staging(out)
    (tmp / "config.json").write_text(config_text)
    (tmp / "metrics.json").write_text(metrics_text)
    fault_point("SAVE", str(tmp))
    ok = result.usable
    write_predictions(tmp / "predictions.csv", cache, result.heads,
                      {h: p[ok] for h, p in result.predictions.items()},
                      np.flatnonzero(cache.usable) if cache.usable is not None
                      else np.arange(len(cache.ids)), members=ok)
    save_safetensors(tensors, tmp / "heads.safetensors",
                     metadata={"qamro_run_version": str(RUN_VERSION)})
    follow_umask(tmp / "heads.safetensors")
    write_history(tmp / "history.csv", result.history)
    return tmp


def follow_umask(path: Path) -> None:
    """Give a file the mode every other file of the run has (0666 less the umask):
    safetensors writes through a private temporary file, which leaves it 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def staging(out: Path) -> Path:
    """The empty sibling folder `.NAME.partial-PID` a run folder is assembled in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, out: Path) -> Path:
    """Rename the assembled folder `tmp` to `out`, replacing (--force, already checked) the
    run folder there: whole or not at all."""
    for f in tmp.iterdir():  # on disk before the name says the run is whole
        fsync_path(f)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder the user made for the run
    kept = keep_aside_name(out, tmp)
    if kept is not None:  # the old run holds what the new one does not write: keep it whole
        note_kept(tmp, out, kept)
        os.replace(out, kept)
        os.replace(tmp, out)
    elif out.exists():  # --force: swap in the new run, then drop the old one
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, old)
        fault_point("SWAP", str(out))
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_path(out.parent)
    return out


def keep_aside_name(out: Path, tmp: Path) -> Path | None:
    """Where --force keeps the run folder `out` it replaces, when that holds anything the new
    run (assembled in `tmp`) does not write again, e.g. the evaluations/ that `evaluate` wrote
    in it: NAME.kept-N, the first free N. None: nothing there would be lost."""
    if not out.is_dir():
        return None
    new = {p.name for p in tmp.iterdir()}
    if not [p for p in out.iterdir() if p.name not in new]:
        return None
    n = 1
    while out.with_name(f"{out.name}.kept-{n}").exists():
        n += 1
    return out.with_name(f"{out.name}.kept-{n}")


def note_kept(tmp: Path, out: Path, kept: Path) -> None:
    """Say in the new run's config.json where the run it replaced was kept, and why."""
    config = json.loads((tmp / "config.json").read_text())
    extra = sorted(p.name for p in out.iterdir() if not (tmp / p.name).exists())
    config["replaced_run_kept"] = {"folder": str(kept), "because_of": extra}
    (tmp / "config.json").write_text(json_text("config", config))
    fsync_path(tmp / "config.json")


def kept_note(folder: Path) -> str | None:
    """The line that tells the user where a replaced run they had added to was kept."""
    try:
        kept = json.loads((Path(folder) / "config.json").read_text()).get("replaced_run_kept")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    return kept and (f"note: the run replaced held {', '.join(kept['because_of'])}, which "
                     f"this run does not write; it was kept whole as {kept['folder']}")


def load_run(run: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the heads of a finished run, refused if from another schema, if
    incomplete, or if heads.safetensors is not a safetensors file (nothing is unpickled)."""
    run = Path(run)
    m = _LEFTOVER.match(run.name)
    if m:
        raise QamroError(f"{run}: an unfinished run folder left by process {m['pid']}, which was "
                         f"killed or failed; rerun training to {run.parent / m['name']}")
    if run.name.startswith(".") and run.name.endswith(".partial"):
        raise QamroError(f"{run}: the saved training state of an unfinished run; rerun its "
                         f"command (or add --resume) to finish it into "
                         f"{run.parent / run.name[1:-len('.partial')]}")
    if not run.exists():
        clean_stale(run)  # a kill in the middle of --force may have left the run aside
    if not run.is_dir():
        raise QamroError(f"{run}: no such run folder")
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        raise QamroError(f"{run}: not a run folder (no config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # (nested too deeply)
        raise QamroError(f"{cfg_path}: not valid JSON ({str(e) or 'nested too deeply'})") \
            from None
    if not isinstance(config, dict) or config.get("qamro_run_version") != RUN_VERSION:
        version = config.get("qamro_run_version") if isinstance(config, dict) else None
        raise QamroError(f"{run}: run folder version {version!r}, this "
                         f"qamro-pipe reads version {RUN_VERSION}")
    if config.get("cv"):  # no heads of its own: each fold is a run
        folds = config["cv"]["folds"]
        raise QamroError(f"{run}: a {folds}-fold cross-validation, whose figures are its "
                         f"metrics.json and predictions.csv; its models are the runs "
                         f"{run}/fold-0 .. fold-{folds - 1} (each trained without its "
                         f"held-out clips); train without --cv for one model of all the data")
    missing = [f for f in RUN_FILES if not (run / f).is_file()]
    if missing:
        raise QamroError(f"{run}: incomplete run folder (missing {', '.join(missing)})")
    heads = run / "heads.safetensors"
    try:
        tensors = load_file(str(heads))
    except Exception as e:  # safetensors raises its own error type for any malformed file
        raise QamroError(f"{heads}: not a valid safetensors file ({str(e).splitlines()[0]}); "
                         f"run folders hold weights only as safetensors, never pickles") from None
    check_config(run, config)
    return config, tensors
