"""Re-score a finished run on a cache: its saved heads, any split, metrics with CIs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig, from_jsonable, member_from_jsonable, override, to_jsonable
from ..errors import CacheError, QamroError
from ..loss_kinds import USED_SETTINGS
from ..metrics import FIGURES, named_systems, system_level_problem
from ..store.reader import Cache, read_cache
from ..train.distribution import output_bins
from ..train.heads import BatchedMLP, HeadSpec
from ..train.holdout import same_holdout
from ..train.inputs import build_head, head_inputs, pools, predict_clips, units_for, weighting_terms
from ..train.joined import join, rows_digest, split_feature
from ..train.run_check import member_indices
from ..train.runs import head_metrics, load_run, write_predictions
from .rankplot import plot_rank_matrix
from .systems import system_scores, write_rank_csv, write_systems_csv

# key fields of the cache that decide what the features mean (not which clips are in it)
FEATURE_KEY = ("backbone", "weights", "companions", "tokenizer", "sample_rate",
               "window_seconds", "precision", "resampler", "downmix")


class TrainedRun:
    """A run folder's heads, ready to score any cache made the same way."""

    def __init__(self, path: str | Path, config: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None):
        """A run folder, or (`config`, `tensors`) read elsewhere: an exported model's."""
        self.path = Path(path)
        self.config, tensors = load_run(self.path) if config is None else (config, tensors)
        try:
            self.heads = tuple(from_jsonable(HeadSpec, h) for h in self.config["heads"])
        except (QamroError, TypeError, ValueError) as e:  # edited by hand, or crafted
            raise QamroError(f"{self.path / 'config.json'}: head settings not readable: "
                             f"{e}") from None
        try:
            self.train_cfg = from_jsonable(TrainConfig, self.config["train"])
        except (QamroError, TypeError, ValueError) as e:  # another version, or edited by hand
            raise QamroError(f"{self.path / 'config.json'}: train settings not readable: "
                             f"{e}") from None
        try:
            self.stats = {h: tuple(float(x) for x in v)
                          for h, v in self.config.get("label_stats", {}).items()}
        except (TypeError, ValueError):
            raise QamroError(f"{self.path / 'config.json'}: 'label_stats' must map each head "
                             f"to numbers (mean, sd)") from None
        self.members = member_indices(self.path, self.config, tensors)
        self.models: dict[str, BatchedMLP] = {}
        self._tensors = tensors

    @property
    def backbone(self) -> str:
        return self.config["backbone"]

    @property
    def sources(self) -> dict[str, dict[str, Any]]:
        """The other caches the run read features from, by the name its recipe gives them."""
        return {s["name"]: s for s in self.config.get("feature_caches", [])}

    def check_cache(self, cache: Cache) -> None:
        _check_made_alike(cache.path, cache.meta.backbone, cache.meta.key, self.backbone,
                          self.config.get("cache_key", {}), self.path)

    def open_cache(self, cache: str | Path | Cache | None = None,
                   paths: dict[str, str | Path | Cache] | None = None) -> tuple[Cache, list]:
        """The cache to score (default: the run's) joined with the other caches the run read
        features from: where the run read them when it is the run's own cache (or at
        `paths`), else found by their names beside it (joined.py); each must hold features
        made as the run's were. A Cache object (the Scorer's, in memory) is used as it is.
        -> (the joined cache, the joined.Source of each other)"""
        primary = cache if isinstance(cache, Cache) else read_cache(cache or self.config["cache"])
        self.check_cache(primary)
        if cache is None:
            self._check_identity(primary)
        own = primary.path.resolve() == Path(self.config["cache"]).resolve()
        if paths is None and own:
            paths = {name: s["path"] for name, s in self.sources.items()}
        joined, sources = join(primary, self.heads, paths)
        for s in sources:
            ran = self.sources.get(s.name, {})
            _check_made_alike(Path(s.path), s.backbone, s.key, ran.get("backbone", s.backbone),
                              ran.get("key", {}), self.path)
        return joined, sources

    def _check_identity(self, cache: Cache) -> None:
        """The cache at the run's recorded path is the one it trained on: the digest of its
        rows (ids, usable rows, the features read) matches config.json's cache_rows. (A run
        recorded with a relative path, evaluated from another folder, would score whatever
        cache lies at that path there.)"""
        recorded = self.config.get("cache_rows")
        if not recorded:  # a run written before the digest was recorded
            return
        own = [f for h in self.heads for f in h.features if split_feature(f)[0] is None]
        try:
            digest = rows_digest(cache, own)
        except KeyError:
            digest = None
        if digest != recorded:
            raise CacheError(f"{cache.path}: not the cache run {self.path} trained on (its "
                             f"clips or features differ from those config.json records); "
                             f"pass --cache {cache.path} to score it anyway")

    def _model(self, head: HeadSpec, x_shape: tuple[int, ...]) -> BatchedMLP:
        if head.name not in self.models:
            members = [member_from_jsonable(m) for m in self.config["members"]]
            try:
                model = build_head(head, [0] * len(self.members), x_shape, self.train_cfg,
                                   n_terms=weighting_terms(members), pools=pools(members),
                                   **self._bins(head))
            except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
                raise QamroError(f"{self.path / 'config.json'}: the settings of head "
                                 f"{head.name!r} or of its members cannot build it "
                                 f"({type(e).__name__}: {str(e)[:200]})") from None
            for i, k in enumerate(self.members):
                prefix = f"{head.name}/m{k}/"
                try:
                    model.load_member(i, {n[len(prefix):]: t for n, t in self._tensors.items()
                                          if n.startswith(prefix)})
                except (RuntimeError, KeyError, ValueError) as e:  # wrong shapes or names
                    raise QamroError(f"{self.path / 'heads.safetensors'}: member {k} of head "
                                     f"{head.name!r} does not fit the head config.json "
                                     f"describes ({str(e).splitlines()[0][:200]})") from None
            self.models[head.name] = model.eval()
        return self.models[head.name]

    def _bins(self, head: HeadSpec) -> dict:
        """build_head's distribution arguments for the run's gaussian-kl members, if any."""
        members = [member_from_jsonable(m) for m in self.config["members"]]
        bins = output_bins(members)
        if bins is None:
            return {}
        return {"bins": bins.scaled(*self.stats.get(head.name, (0.0, 1.0))),
                "uses_bins": bins.subset(self.members).uses}

    def predict(self, cache: Cache) -> dict[str, np.ndarray]:
        """head -> [members, clips] scores on the labels' scale."""
        self.check_cache(cache)
        members = [member_from_jsonable(m) for m in self.config["members"]]
        member_pools = [members[k].loss.pool for k in self.members]
        units = {p: units_for(cache, self.heads, p) for p in dict.fromkeys(member_pools)}
        out = {}
        for h in self.heads:
            x = {p: torch.from_numpy(head_inputs(cache, h, p)) for p in units}
            model = self._model(h, tuple(next(iter(x.values())).shape))
            out[h.name] = predict_clips(model, {p: (x[p], units[p]) for p in units},
                                        member_pools, self.stats.get(h.name, (0.0, 1.0)))
        return out


def _check_made_alike(path: Path, backbone: str, key: dict, run_backbone: str, run_key: dict,
                      run: Path) -> None:
    """A cache's features are made as those a run trained on: backbone, weights, audio
    preprocessing (which clips it holds may differ)."""
    if backbone != run_backbone:
        raise CacheError(f"{path}: made with backbone {backbone}, but run {run} was trained "
                         f"on {run_backbone} features")
    diffs = [f"{k}: cache {key.get(k)!r}, run {run_key.get(k)!r}"
             for k in FEATURE_KEY if k in run_key and key.get(k) != run_key.get(k)]
    if diffs:
        raise CacheError(f"{path}: features made differently from run {run}'s ("
                         + "; ".join(diffs) + ")")


def select_members(config: dict[str, Any], present: list[int], selection: str | None):
    """Indices (into `present`, the members a run kept) chosen by "key=value,..." over the
    loss settings and seed: `beta=7`, `loss=mr`, `alpha=0.2,seed=0`. A member matches a
    setting only if its loss kind uses it (an L_MR member has no beta). -> (positions,
    normalised selection)."""
    if not selection:
        return list(range(len(present))), None
    wanted: dict[str, str] = {}
    for part in selection.split(","):
        key, sep, value = (x.strip() for x in part.partition("="))
        key = "kind" if key == "loss" else key
        if not sep or key not in ("kind", "alpha", "beta", "margin", "seed") or not value:
            raise QamroError(f"--members {selection!r}: use key=value pairs separated by commas, "
                             f"keys loss, alpha, beta, margin, seed (e.g. beta=7,seed=0)")
        wanted[key] = value

    def matches(member: dict[str, Any]) -> bool:
        loss = member["loss"]
        for key, value in wanted.items():
            if key == "kind":
                if loss["kind"] != value:
                    return False
                continue
            have = member["seed"] if key == "seed" else loss[key]
            if key != "seed" and key not in USED_SETTINGS[loss["kind"]]:
                return False
            try:
                if float(have) != float(value):
                    return False
            except ValueError:
                raise QamroError(f"--members {selection!r}: {value!r} is not a number") from None
        return True

    picked = [i for i, k in enumerate(present) if matches(config["members"][k])]
    if not picked:
        raise QamroError(f"--members {selection!r}: no member of this run matches (it has: "
                         f"{'; '.join(_member_label(config['members'][k]) for k in present)})")
    norm = ",".join(f"{'loss' if k == 'kind' else k}={v}" for k, v in sorted(wanted.items()))
    return picked, norm


def _member_label(member: dict[str, Any]) -> str:
    return member_from_jsonable(member).label()


def scoring_rule(config: dict[str, Any], members: list[int]) -> dict[str, Any]:
    """What `evaluate` scores, in words and as data: the mean of these members' predictions."""
    labels = [_member_label(config["members"][k]) for k in members]
    settings = sorted({label.rsplit(" seed=", 1)[0] for label in labels})
    if len(members) == 1:
        text = f"the predictions of its one member ({labels[0]})"
    else:
        text = (f"the mean of the predictions of {len(members)} members over "
                f"{len(settings)} setting(s): {'; '.join(settings)}")
    return {"text": text, "members": labels, "settings": settings}


def _split_warning(tr: TrainedRun, data: Cache, split: str) -> str | None:
    """The run saw `split` while training (the same dataset's split of that name)."""
    if data.meta.dataset != tr.config.get("dataset"):
        return None
    val = tr.train_cfg.val_split
    if split == "train":
        how = ("trained on it" + (" and early-stopped on a holdout part of it"
                                  if val == "holdout" else ""))
    elif split == val:
        how = "early-stopped on it (--val-split)"
    else:
        return None
    return (f"split {split!r} is one this run {how}: these figures are not a held-out "
            f"estimate")


def system_outputs(folder: Path, data: Cache, heads, preds: dict[str, np.ndarray],
                   rows: np.ndarray, n_boot: int, split: str) -> dict[str, Any]:
    """Per head: systems.csv's rows (predicted MOS with its interval), rank-HEAD.csv (the
    matrix P(A ranks above B)) and rank-HEAD.png, over every scored clip of `rows` (a label
    is not needed). -> the summary metrics.json keeps."""
    problem = system_level_problem(data.systems[rows])
    if problem:
        return {"computable": False, "why": problem}
    rows = rows[named_systems(data.systems[rows])]
    by_head, summary = {}, {"computable": True, "resamples": n_boot, "file": "systems.csv",
                            "heads": {}}
    for h in heads:
        s = system_scores(preds[h.name][:, rows], data.systems[rows], n_boot)
        by_head[h.name] = (s, _true_mos(data, h, rows))
        entry = {"systems": len(s.names), "members": s.members, "best": str(s.names[0]),
                 "worst": str(s.names[-1])}
        if s.above is not None:
            stem = "rank-" + re.sub(r"[^A-Za-z0-9._-]", "_", h.name)
            write_rank_csv(folder / f"{stem}.csv", s)
            plot_rank_matrix(folder / f"{stem}.png", s, h.name, split)
            entry.update(matrix=f"{stem}.csv", picture=f"{stem}.png",
                         median_interval=float(np.median(s.hi - s.lo)),
                         separated_neighbours=s.separated_neighbours(),
                         neighbours=len(s.names) - 1)
        summary["heads"][h.name] = entry
    write_systems_csv(folder / "systems.csv", by_head)
    return summary


def _true_mos(data: Cache, head, rows: np.ndarray) -> dict[str, float]:
    """The systems' published MOS where the cache has one for every system (as the system-
    level figures use it), else the mean label of their clips (systems without one left out)."""
    if head.label not in data.label_names:  # an unlabelled cache: no true MOS to show
        return {}
    col = data.label_names.index(head.label)
    names = [str(s) for s in np.unique(data.systems[rows])]
    published = {s: float(data.system_mos[s][col]) for s in names if s in data.system_mos}
    if len(published) == len(names) and all(np.isfinite(v) for v in published.values()):
        return published
    out = {}
    for s in names:
        y = data.labels[rows[data.systems[rows] == s], col]
        if np.isfinite(y).any():
            out[s] = float(np.nanmean(y))
    return out


def unlabelled_heads(data: Cache, heads, rows: np.ndarray, split: str,
                     run: Path) -> dict[str, str]:
    """head -> why it has no figures on these rows: the cache has no labels at all (an
    unlabelled manifest's) or none on this split. Such heads are still scored (predictions,
    systems' intervals, rank matrix). A cache whose labels are named otherwise than the run's
    heads' is refused: its figures would compare the wrong columns, or none."""
    if data.label_names:
        missing = [h.label for h in heads if h.label not in data.label_names]
        if missing:
            raise QamroError(
                f"{data.path}: its labels are {', '.join(data.label_names)}; run {run} "
                f"predicts {', '.join(dict.fromkeys(h.label for h in heads))} "
                f"({', '.join(missing)} missing). Name the score columns as the run's, or "
                f"score a cache without labels (predictions and intervals only)")
    out = {}
    for h in heads:
        if not data.label_names:
            out[h.name] = f"{data.path} has no labels"
        elif not np.isfinite(data.labels[rows, data.label_names.index(h.label)]).any():
            out[h.name] = f"split {split!r} of {data.path} has no {h.label!r} labels"
    return out


def no_figures(why: str) -> dict[str, Any]:
    """metrics.json's entry for a head scored without labels: no figures, and why."""
    empty = {f: None for f in FIGURES}
    return {"labelled": False, "why": why, "utterance": {**empty, "n": 0},
            "system": {**empty, "not_computable": f"{why}: predictions only"}}


def evaluation_name(cache: Path, split: str, selection: str | None) -> str:
    """<cache stem>-<digest of the cache's full path>-<split>[-<selection>]: evaluations of
    different caches with the same file name, or of other members, never share a folder."""
    digest = hashlib.sha256(str(Path(cache).resolve()).encode()).hexdigest()[:8]
    name = f"{Path(cache).stem}-{digest}-{split}"
    return name + (f"-{re.sub(r'[^A-Za-z0-9.=,_-]', '_', selection)}" if selection else "")


def evaluate_run(run: str | Path, split: str | None = None, cache: str | Path | None = None,
                 n_boot: int = 1000, members: str | None = None, top_tier: float | None = None,
                 top_k: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Score a run's heads on `split` (default: the run's eval split) of a cache (default:
    the one it trained on): the mean of its members' predictions, or of those `members`
    selects (`select_members`); the top tier at `top_tier` and `top_k`, else the run's.
    Writes RUN/evaluations/<evaluation_name>/metrics.json and predictions.csv; metrics.json
    says what was scored, and warns when the run saw the split."""
    tr = TrainedRun(run)
    cfg = override(tr.train_cfg, top_tier=top_tier, top_k=top_k)
    fold = tr.config.get("cv_fold")
    if fold and split is None:  # its eval split exists only inside the cross-validation
        raise QamroError(f"{tr.path}: fold {fold['fold']} of a {fold['folds']}-fold "
                         f"cross-validation; its held-out clips are scored in its "
                         f"predictions.csv and metrics.json. Name a split of the cache to "
                         f"score (--split)")
    split = split or tr.train_cfg.eval_split
    picked, selection = select_members(tr.config, tr.members, members)
    data, sources = tr.open_cache(cache)
    held = tr.config.get("eval_holdout")
    if held and split == held["split"] and \
            data.path.resolve() == Path(tr.config["cache"]).resolve():
        data = same_holdout(data, held)[0]  # the report split the run held out of train
    rows = data.rows(split)
    if len(rows) == 0:
        raise QamroError(f"{data.path}: split {split!r} has no usable rows (splits here: "
                         f"{', '.join(sorted(set(data.splits)))})")
    preds = {h: p[picked] for h, p in tr.predict(data).items()}
    means = {h: p.mean(0) for h, p in preds.items()}  # the run's score: mean over members
    unlabelled = unlabelled_heads(data, tr.heads, rows, split, tr.path)
    heads = head_metrics(data, [h for h in tr.heads if h.name not in unlabelled], means, rows,
                         n_boot, what=f" split {split!r}", cfg=cfg)
    heads = {h.name: heads.get(h.name) or no_figures(unlabelled[h.name]) for h in tr.heads}
    warning = _split_warning(tr, data, split)
    metrics = {"run": str(tr.path), "cache": str(data.path), "eval_split": split,
               "feature_caches": {s.name: s.path for s in sources} or None,
               "validation": tr.config.get("validation"),
               "members": len(picked), "selection": selection,
               "scored": scoring_rule(tr.config, [tr.members[i] for i in picked]),
               "warnings": [warning] if warning else [], "heads": heads}
    problem = next((m["system"]["not_computable"] for m in heads.values()
                    if m["system"].get("not_computable")), None)
    metrics["system_level"] = {"computable": problem is None, "why": problem}
    out = tr.path / "evaluations" / evaluation_name(data.path, split, selection)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_predictions(tmp / "predictions.csv", data, tr.heads, preds, rows,
                          members=[tr.members[i] for i in picked])
        metrics["systems"] = system_outputs(tmp, data, tr.heads, preds, rows, n_boot, split)
        (tmp / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=2) + "\n")
        if out.exists():  # this run's own earlier evaluation of the same cache, split, members
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:  # a full disk or a read-only folder: leave no half-written evaluation behind
        shutil.rmtree(tmp, ignore_errors=True)
    return out, metrics
