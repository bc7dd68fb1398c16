"""The public Python face: a trained run, a sweep or an exported model folder as an object
that scores audio, loaded once and called many times.

    from qamro_pipe import Scorer
    scorer = Scorer.load("runs/musiceval")          # or an exported folder, or "owner/name"
    rows = scorer.score(["a.wav", "b.flac"], text="calm piano")
    # [{"id": "a", "overall": 3.91, "textual": 3.55}, ...]: the rows `qamro-pipe predict` writes

Each backbone the run's heads read is built and loaded once, when the scorer is loaded, and
kept; every call embeds its clips in memory (extract/memory.py: extraction's own decoding,
resampling, windows, batches and precision, as each cache recorded them) and scores them with
the run's heads, as `evaluate` scores a cache. `qamro-pipe predict` is this object over files.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import EXTRACT_BATCH, ExtractConfig, override
from .errors import DataError, QamroError
from .extract.backbones import Backbone, get_backbone
from .extract.datasets import DatasetRecords
from .extract.loop import cache_key, extract_device
from .extract.memory import Item, embed_items
from .model_folder import is_model_folder, read_model, resolve
from .preference import pair_rows
from .report.evaluate import FEATURE_KEY, TrainedRun, select_members
from .train.joined import split_feature


def sd_name(head: str) -> str:
    """The column of a head's spread over members, next to its score."""
    return f"{head}_sd"


class _Extractor:
    """One backbone the heads read, built and loaded with the settings its cache recorded:
    name None for the run's own cache, else the name the recipe gives the other cache."""

    def __init__(self, name: str | None, cfg: ExtractConfig, texts: bool):
        self.name, self.cfg, self.texts = name, cfg, texts
        self.bb: Backbone = get_backbone(
            cfg.backbone, checkpoint=cfg.checkpoint, device=extract_device(cfg.device),
            precision=cfg.precision, offline=cfg.offline, tokenizer_dir=cfg.tokenizer_dir,
            audio_input=cfg.clap_input, keep_windows=cfg.keep_windows)

    def key(self) -> dict[str, Any]:
        """What made these numbers, as a cache key says it (weights by their sha256)."""
        return cache_key(DatasetRecords(name="predict", label_names=(), clips=[]), self.bb,
                         self.texts)

    def batch_size(self, given: int | None) -> int:
        gpu = str(self.bb.device).startswith("cuda")
        return given or self.cfg.batch_size or EXTRACT_BATCH["cuda" if gpu else "cpu"]


class Scorer:
    """Scores audio with a trained run's backbone(s) and heads. Build with `Scorer.load`."""

    def __init__(self, trained: TrainedRun, extractors: list[_Extractor], picked: list[int],
                 selection: str | None, folder: Path, batch_size: int | None = None):
        self.trained, self.extractors, self.picked = trained, extractors, picked
        self.selection, self.folder, self.batch_size = selection, folder, batch_size

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "auto", members: str | None = None, *,
             checkpoint: str | None = None, tokenizer_dir: str | None = None,
             batch_size: int | None = None, revision: str | None = None,
             offline: bool | None = None) -> "Scorer":
        """A run folder, a sweep (`members` picks settings as `evaluate --members`: "beta=7"),
        an exported model folder, or a Hugging Face model `owner/name[@REVISION]` (read from
        the local cache; fetched once when online). `checkpoint` names the run's own
        backbone's weights file where the recorded one is not on this machine; `device` is
        auto, cpu, cuda or cuda:N. The backbones load now, once."""
        device = device or "auto"
        override(ExtractConfig(), device=device, batch_size=batch_size)  # checked first
        folder = resolve(path, revision, offline)
        if is_model_folder(folder):
            config, tensors = read_model(folder)
            trained = TrainedRun(folder, config, tensors)
        else:
            trained = TrainedRun(folder)
        picked, selection = select_members(trained.config, trained.members, members)
        given = {"device": device, "checkpoint": checkpoint, "tokenizer_dir": tokenizer_dir,
                 "offline": offline}
        extractors = [_Extractor(name, _extract_config(saved, backbone, opts), texts)
                      for name, saved, backbone, texts, opts in _caches(trained, given)]
        for ex in extractors:
            _check_alike(ex, trained)
            ex.bb.load()  # once: a loaded backbone stays loaded
        return cls(trained, extractors, picked, selection, folder, batch_size)

    @property
    def heads(self) -> list[str]:
        return [h.name for h in self.trained.heads]

    @property
    def sample_rate(self) -> int:
        """The rate the run's own backbone reads audio at (what arrays are resampled to)."""
        return self.extractors[0].bb.sample_rate

    @property
    def members(self) -> int:
        return len(self.picked)

    def __repr__(self) -> str:
        return (f"Scorer({str(self.folder)!r}, heads={self.heads}, members={self.members}, "
                f"backbones={[ex.bb.key for ex in self.extractors]})")

    # -- scoring ---------------------------------------------------------------------------
    def score(self, audio, sr: int | None = None, text: str | Sequence[str] | None = None,
              batch_size: int | None = None, system: str | None = None
              ) -> list[dict[str, Any]]:
        """`audio`: a path, a numpy array or torch tensor ([samples] or [channels, samples]
        at `sr`), or a list of those; `text`: one prompt for all, or one per clip. -> one
        dict per clip, in input order: {"id", HEAD: score, HEAD_sd: spread over members
        (several members only)}, the rows `qamro-pipe predict` writes. A clip that cannot
        be scored raises DataError naming it. `system`: the clips are that system's, whose
        offset `recalibrate` recorded: it is added to each head's score."""
        from .recalibrate import apply_offsets  # on use

        offsets = self.offsets(system)
        rows, failures = self.score_items(as_items(audio, sr, text), batch_size)
        _raise(failures)
        if offsets:
            apply_offsets(rows, offsets)
        return rows

    def offsets(self, system: str | None) -> dict[str, Any] | None:
        """The score offsets `recalibrate` recorded for `system` (None: no system given);
        refused when none is recorded for this model and member selection."""
        from .recalibrate import read_offsets  # on use

        if system is None:
            return None
        offsets = read_offsets(self.folder, self.selection).get(system)
        if offsets is None:
            raise QamroError(f"system {system!r}: no offset recorded for this model "
                             f"({self.selection or 'all members'}); fit one with "
                             f"Scorer.recalibrate or `qamro-pipe calibrate-system`")
        return offsets

    def recalibrate(self, pairs: str | Path, system: str, n_boot: int = 1000
                    ) -> dict[str, Any]:
        """Fit the score offset of `system`, a system this model was not trained on, from
        labelled pairs comparing its clips with clips of systems it knows (recalibrate.py:
        a Bradley-Terry fit per head, with a bootstrap 95% interval), and record it in the
        model folder (system_offsets.json), so `score(..., system=NAME)` applies it.
        -> {head: {"offset", "interval", "pairs", ...}}."""
        from .recalibrate import recalibrate  # on use

        return recalibrate(self, pairs, system, n_boot)

    def score_items(self, items: list[Item], batch_size: int | None = None
                    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """-> (rows of the clips scored, {id: why} of the others), for callers that go on
        past bad clips (`predict`)."""
        if not items:
            return [], {}
        caches, failures = self._embed(items, batch_size)
        primary = caches.pop(None)
        joined, _ = self.trained.open_cache(primary, caches)
        scores = self.trained.predict(joined)
        rows = []
        for i, cid in enumerate(joined.ids):
            if not joined.usable[i]:
                continue
            row: dict[str, Any] = {"id": str(cid)}
            for h in self.heads:
                p = scores[h][self.picked, i]
                v = float(p.mean())
                if not math.isfinite(v):
                    failures[str(cid)] = f"{cid}: the heads produced a non-finite score"
                    break
                row[h] = v
                if len(p) > 1:
                    row[sd_name(h)] = float(p.std(ddof=1))
            else:
                rows.append(row)
        return rows, failures

    def embed(self, audio, sr: int | None = None, text: str | Sequence[str] | None = None,
              batch_size: int | None = None) -> list[dict[str, Any]]:
        """The backbones' features of the same inputs, one dict per clip: {"id", FEATURE:
        array}; clip features are [*shape], per-window ones [windows, *shape] with
        "window_weight" ([windows], each window's length); a pooled feature whose windows
        are kept (extract --keep-windows) also as FEATURE/windows. Another cache's features
        are named as the run's heads name them, CACHE:FEATURE."""
        items = as_items(audio, sr, text)
        if not items:
            return []
        caches, failures = self._embed(items, batch_size)
        _raise(failures)
        out: list[dict[str, Any]] = [{"id": it.id} for it in items]
        for name, cache in caches.items():
            prefix = "" if name is None else f"{name}:"
            for i, row in enumerate(out):
                for k, v in cache.features.items():
                    row[prefix + k] = v[i]
                if cache.window_offsets is not None:
                    sl = slice(int(cache.window_offsets[i]), int(cache.window_offsets[i + 1]))
                    for k, v in cache.windows.items():  # kept windows of a pooled feature:
                        row[prefix + k + ("/windows" if k in cache.features else "")] = v[sl]
                    row.setdefault("window_weight", cache.window_weight[sl])
        return out

    def prefer(self, audio_a, audio_b, text: str | Sequence[str] | None = None,
               sr: int | None = None, head: str | None = None,
               batch_size: int | None = None) -> list[dict[str, Any]]:
        """P(A preferred over B) per head for each pair (audio_a[i], audio_b[i]), a
        Bradley-Terry link on the score difference (preference.py): one dict per pair,
        {"preferred": "A" or "B" (by `head`, default the first), "p_HEAD": P(A over B),
        "HEAD_a", "HEAD_b": the scores, "calibration": how the temperature was set}."""
        a, b = as_items(audio_a, sr, text), as_items(audio_b, sr, text)
        if len(a) != len(b):
            raise QamroError(f"prefer: {len(a)} clips A and {len(b)} clips B; give one B "
                             f"for each A")
        both = [_renamed(x, f"a{i}") for i, x in enumerate(a)] + \
               [_renamed(x, f"b{i}") for i, x in enumerate(b)]
        rows, failures = self.score_items(both, batch_size)
        _raise(failures)
        by_id = {r["id"]: r for r in rows}
        return pair_rows(self, [(by_id[f"a{i}"], by_id[f"b{i}"]) for i in range(len(a))],
                         head)

    def _embed(self, items: list[Item], batch_size: int | None):
        """Each backbone's in-memory cache of `items` -> ({name: Cache}, failures)."""
        caches, failures = {}, {}
        for ex in self.extractors:
            caches[ex.name], bad = embed_items(ex.bb, items,
                                               ex.batch_size(batch_size or self.batch_size),
                                               ex.texts)
            failures.update(bad)
        return caches, failures


def _check_alike(ex: _Extractor, tr: TrainedRun) -> None:
    """Before loading: the backbone as built here makes the features the run was trained on
    (its version, the weights file by sha256, the audio settings), or one line says what
    differs and which weights file the run recorded."""
    ran = tr.config.get("cache_key", {}) if ex.name is None else tr.sources[ex.name]["key"]
    backbone = tr.backbone if ex.name is None else tr.sources[ex.name]["backbone"]
    now = ex.key()
    diffs = [] if ex.bb.key == backbone else [f"backbone: now {ex.bb.key}, trained on "
                                              f"{backbone}"]
    diffs += [f"{k}: now {now.get(k)!r}, trained with {ran.get(k)!r}" for k in FEATURE_KEY
              if k in ran and now.get(k) != ran.get(k)]
    if diffs:
        saved = (tr.config.get("cache_config") if ex.name is None
                 else tr.sources[ex.name].get("cache_config")) or {}
        recorded = saved.get("provenance", {}).get("checkpoint")
        hint = (f"; give the weights file it was trained with ({recorded}) as checkpoint= "
                f"(--checkpoint)" if recorded and ex.name is None else "")
        raise QamroError(f"{tr.path}: {ex.bb.name} as built here does not make the features "
                         f"this model was trained on ({'; '.join(diffs)}){hint}")


def _renamed(item: Item, new_id: str) -> Item:
    return replace(item, id=new_id)


def _raise(failures: dict[str, str]) -> None:
    if failures:
        first = next(iter(failures.values()))
        more = f" (and {len(failures) - 1} more clip(s) that cannot be scored)" \
            if len(failures) > 1 else ""
        raise DataError(first + more)


def as_items(audio, sr: int | None = None, text: str | Sequence[str] | None = None
             ) -> list[Item]:
    """What `score` accepts -> Items: a path, an array or tensor ([samples] or [channels,
    samples]), or a list of those. Files are named by their stem (their path where two
    share one), arrays by their position ("#0", "#1", ...)."""
    clips = list(audio) if isinstance(audio, (list, tuple)) else [audio]
    texts = _texts(text, len(clips))
    ids, items = _ids(clips), []
    for i, (clip, cid, t) in enumerate(zip(clips, ids, texts)):
        if isinstance(clip, (str, Path)):
            items.append(Item(id=cid, path=Path(clip), text=t))
            continue
        if hasattr(clip, "detach"):  # a torch tensor, without importing torch here
            clip = clip.detach().cpu().float().numpy()
        if not isinstance(clip, np.ndarray):
            raise QamroError(f"audio #{i}: a path, a numpy array or a torch tensor is needed, "
                             f"not {type(clip).__name__}")
        if sr is None:
            raise QamroError(f"audio #{i}: audio given as samples needs its sample rate: "
                             f"score(..., sr=RATE)")
        items.append(Item(id=cid, samples=clip, sr=sr, text=t))
    return items


def _texts(text, n: int) -> list[str]:
    if text is None or isinstance(text, str):
        return [text or ""] * n
    texts = list(text)
    if len(texts) != n:
        raise QamroError(f"text: {len(texts)} prompts for {n} clips; give one for all or one "
                         f"per clip")
    return [t or "" for t in texts]


def clip_ids(files: list[Path]) -> list[str]:
    """Each file's id: its name without the extension (as AudioMOS answer files name clips),
    and where two share it, as many of its folders before it as tell them apart (a/x, b/x):
    one file's id never changes with the others given beside it but for such a clash."""
    parts = [f.with_suffix("").parts for f in files]
    ids = []
    for p in parts:
        depth = 1
        while any(q != p and q[-depth:] == p[-depth:] for q in parts) and depth < len(p):
            depth += 1
        ids.append("/".join(p[-depth:]))
    if len(set(ids)) != len(set(parts)):  # a.wav and a.flac in one folder: the extension
        ids = [f"{i}{f.suffix}" for i, f in zip(ids, files)]
    return ids


def _ids(clips: list) -> list[str]:
    paths = [Path(c) if isinstance(c, (str, Path)) else None for c in clips]
    named = iter(clip_ids([p for p in paths if p is not None]))
    ids = [next(named) if p is not None else f"#{i}" for i, p in enumerate(paths)]
    seen: dict[str, int] = {}
    for i, cid in enumerate(ids):  # the same file twice: its later rows are told apart
        seen[cid] = seen.get(cid, 0) + 1
        if seen[cid] > 1:
            ids[i] = f"{cid}#{i}"
    return ids


def _caches(tr: TrainedRun, given: dict[str, Any]):
    """(name, saved cache config, backbone, reads text, options) of each cache the heads
    read: the run's own first. `checkpoint` is the run's own backbone's alone."""
    own = [f for h in tr.heads for f in h.features if split_feature(f)[0] is None]
    yield None, tr.config.get("cache_config"), tr.backbone, \
        _reads_text(tr.backbone, own), given
    others = {k: v for k, v in given.items() if k != "checkpoint"}
    for name, s in tr.sources.items():
        yield name, s.get("cache_config"), s["backbone"], \
            _reads_text(s["backbone"], s["features"]), others


def _extract_config(saved: dict[str, Any] | None, backbone: str,
                    opts: dict[str, Any]) -> ExtractConfig:
    """The settings a cache recorded for extraction (not where or how fast it ran), for its
    backbone, with the options given."""
    saved = (saved or {}).get("extract", {})
    cfg = override(ExtractConfig(), **{k: v for k, v in saved.items()
                                       if k in ExtractConfig.__dataclass_fields__
                                       and k not in ("device", "workers", "skip_bad")})
    return override(cfg, backbone=backbone.split("@")[0], workers=0, skip_bad=True,
                    **{k: v for k, v in opts.items() if v is not None})


def _reads_text(backbone: str, features) -> bool:
    """Whether the run reads text features of this backbone: they are made even for clips
    without text ("")."""
    specs = get_backbone(backbone.split("@")[0]).feature_specs()
    return any(specs[f].text for f in features if f in specs)
