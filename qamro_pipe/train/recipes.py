"""Experiments as data: a recipe (stages/NAME.toml) names the dataset, backbone and heads.

The paper's hyper-parameters live in config.py; a recipe only overrides what its dataset needs.
The format is documented in docs/recipes.md. A cache of a dataset no recipe is written for
(a user's manifest) trains without one: `recipe_from_cache` gives one head per label."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import DEFAULT_RECIPE, cache_root, check_label_range, check_seeds, tuples
from ..errors import QamroError
from ..metrics import FIGURES, TOP_FIGURES
from ..store.reader import read_cache, read_meta
from .heads import ACTIVATIONS, HeadSpec


def _shipped_stages() -> Path:
    """The recipes that come with qamro-pipe: the top-level stages/ of a checkout (or an
    editable install), mapped to qamro_pipe/stages/ inside a wheel (setup.py)."""
    package = Path(__file__).resolve().parents[1]
    in_wheel = package / "stages"
    return in_wheel if in_wheel.is_dir() else package.parent / "stages"


STAGES_DIR = _shipped_stages()
_KEYS = {"name", "dataset", "backbone", "label_range", "heads", "train", "loss", "grids",
         "reference"}


@dataclass(frozen=True)
class Recipe:
    name: str
    dataset: str  # dataset loader name
    backbone: str  # backbone registry name
    heads: tuple[HeadSpec, ...]
    label_range: tuple[float, float] | None = None  # the labels' declared scale
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    loss: dict[str, Any] = field(default_factory=dict)  # LossConfig overrides
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)  # named sweep grids
    reference: dict[str, Any] = field(default_factory=dict)  # published figures
    path: Path | None = None
    derived: str | None = None  # how the heads were chosen when no recipe file was named

    def default_cache(self) -> Path:
        return cache_root() / self.dataset / f"{self.backbone}.h5"

    def where(self) -> str:
        return str(self.path) if self.path else f"recipe {self.name!r}"


def find_recipe(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    for candidate in (p, Path("stages") / f"{p}.toml", STAGES_DIR / f"{p}.toml"):
        if candidate.is_file():
            return candidate
    known = sorted(f.stem for f in STAGES_DIR.glob("*.toml")) if STAGES_DIR.is_dir() else []
    raise QamroError(f"no recipe {str(name_or_path)!r} (a .toml path, or one of: "
                     f"{', '.join(known) or 'none found'})")


def _head(h: dict[str, Any], path: Path) -> HeadSpec:
    extra = tuples({k: v for k, v in h.items() if k not in ("name", "label", "features")})
    spec = HeadSpec(name=h["name"], label=h.get("label", h["name"]),
                    features=tuple(h["features"]), **extra)
    if not spec.features:
        raise QamroError(f"{path}: head {spec.name!r} reads no features")
    empty = [f for f in spec.features if not f or f.endswith(":")]
    if empty:  # CACHE:FEATURE (train/joined.py) with the feature left out
        raise QamroError(f"{path}: head {spec.name!r}: {empty[0]!r} names no feature (use "
                         f"NAME, or CACHE:NAME for a feature of another cache)")
    if spec.activation is not None and spec.activation not in ACTIVATIONS:
        raise QamroError(f"{path}: head {spec.name!r}: unknown activation {spec.activation!r}; "
                         f"use {', '.join(ACTIVATIONS)}")
    if spec.hidden is not None and any(not isinstance(w, int) or w < 1 for w in spec.hidden):
        raise QamroError(f"{path}: head {spec.name!r}: hidden widths must be whole numbers >= 1")
    return spec


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise QamroError(f"{path}: not valid TOML: {e}") from None
    unknown = set(data) - _KEYS
    if unknown:
        raise QamroError(f"{path}: unknown recipe key(s) {', '.join(sorted(unknown))} "
                         f"(see docs/recipes.md)")
    try:
        heads = tuple(_head(h, path) for h in data["heads"])
        lr = data.get("label_range")
        check_label_range(lr, f"{path}: label_range")
        recipe = Recipe(name=data.get("name", path.stem), dataset=data["dataset"],
                        backbone=data["backbone"], heads=heads,
                        label_range=tuple(float(v) for v in lr) if lr else None,
                        train=data.get("train", {}), loss=data.get("loss", {}),
                        grids=data.get("grids", {}), reference=data.get("reference", {}),
                        path=path)
    except (KeyError, TypeError) as e:  # a missing key, or an unknown head setting
        raise QamroError(f"{path}: recipe is missing or mistypes {e}") from None
    if not heads:
        raise QamroError(f"{path}: a recipe needs at least one [[heads]] entry")
    names = [h.name for h in heads]
    if len(set(names)) != len(names):
        raise QamroError(f"{path}: head names must be unique ({', '.join(names)})")
    return recipe


def shipped_recipes() -> list[Recipe]:
    """The model recipes in stages/ (table recipes, which have no heads, are left out), the
    one named after its dataset before its presets (musiceval before musiceval-code)."""
    out = []
    for p in sorted(STAGES_DIR.glob("*.toml")):
        try:
            out.append(load_recipe(p))
        except QamroError:
            continue
    return sorted(out, key=lambda r: r.name != r.dataset)


def recipe_from_cache(cache) -> Recipe:
    """A recipe for a cache no recipe is written for (a user's manifest): one head per label
    column. The head's shape (features, layers, widths) is the one a shipped recipe gives the
    same backbone: MusicEval's [audio ; text] head where the cache has texts, else its audio
    head; Audiobox-Aesthetics' per-layer head on per-window features. Without a shipped
    recipe for the backbone: an MLP on the clip features (audio, plus text where the cache
    has texts)."""
    if not cache.label_names:
        raise QamroError(f"{cache.path}: no labels to train on (a manifest's score columns are "
                         f"every column but id, path, system, text, split, start and end, and "
                         f"it had none); add a score column, or score these clips with a "
                         f"trained run (`evaluate RUN --cache`, `predict`)")
    backbone = cache.meta.backbone.split("@")[0]
    has_text = "text" in cache.features and cache.texts is not None and any(cache.texts)
    have = set(cache.windows) | (set(cache.features) - ({"text"} if not has_text else set()))
    template, source = None, None
    for r in shipped_recipes():
        if r.backbone != backbone:
            continue
        fits = [h for h in r.heads if set(h.features) <= have]
        if fits:
            template = max(fits, key=lambda h: len(h.features))
            source = f"the {r.name!r} recipe's {template.name!r} head"
            break
    if template is None:
        clip = [f for f in ("audio", *sorted(cache.features))
                if f in have and (f in cache.features or f not in cache.windows)]
        feats = tuple(dict.fromkeys(clip)) or tuple(sorted(cache.windows))[:1]
        if not feats:
            raise QamroError(f"{cache.path}: the cache holds no features to train on")
        template = HeadSpec(name="", label="", features=feats,
                            layer_weights=any(cache.windows[f].ndim == 3
                                              for f in feats if f in cache.windows))
        source = "an MLP with config.py's widths"
    heads = tuple(replace(template, name=label, label=label) for label in cache.label_names)
    lr = cache.meta.config.get("label_range")
    why = (f"no recipe for dataset {cache.meta.dataset!r}: one head per label "
           f"({', '.join(cache.label_names)}) on {' + '.join(template.features)}, shaped like "
           f"{source}")
    return Recipe(name=cache.meta.dataset, dataset=cache.meta.dataset, backbone=backbone,
                  heads=heads, label_range=tuple(lr) if lr else None, derived=why)


def select_recipe(recipe: str | None = None, dataset: str | None = None,
                  backbone: str | None = None, cache: str | Path | None = None,
                  default: str = DEFAULT_RECIPE) -> Recipe:
    """The CLI's choice: --recipe NAME|PATH, or --dataset NAME (its recipe has that name), and
    --backbone to read that backbone's cache of the dataset instead of the recipe's. With
    neither, a --cache of another dataset than the default recipe's gets the shipped recipe
    for its dataset, or else one derived from the cache (`recipe_from_cache`)."""
    if recipe is None and dataset is None and cache is not None:
        meta = read_meta(cache)
        local = Path("stages") / f"{meta.dataset}.toml"  # the user's own, as --recipe finds it
        if local.is_file():
            r = load_recipe(local)
            return replace(r, backbone=backbone) if backbone else r
        r = load_recipe(default)
        if meta.dataset == r.dataset:
            return replace(r, backbone=backbone) if backbone else r
        for r in shipped_recipes():
            if r.dataset == meta.dataset:
                return replace(r, backbone=backbone) if backbone else r
        return recipe_from_cache(read_cache(cache))
    r = load_recipe(recipe or dataset or default)
    if dataset and r.dataset != dataset:
        raise QamroError(f"recipe {r.name!r} is for dataset {r.dataset!r}, not {dataset!r}")
    return replace(r, backbone=backbone) if backbone else r


# -- table recipes: rows of loss settings trained on one model recipe (experiments/tables.py)
@dataclass(frozen=True)
class TableRecipe:
    name: str
    model: str  # the model recipe whose heads, dataset and backbone every row trains
    rows: tuple[tuple[str, dict[str, Any]], ...]  # (row name, LossConfig settings)
    seeds: int = 5  # seeds per row (the paper's tables average 5 runs)
    level: str = "system"  # the level the figures are read at (utterance without systems)
    figures: tuple[str, ...] = FIGURES  # the columns of each head
    reference: dict[str, Any] = field(default_factory=dict)  # published figures
    presets: dict[str, str] = field(default_factory=dict)  # --preset NAME -> model recipe
    release_row: str | None = None  # label of a row scoring the released Audiobox-Aesthetics
    # model zero-shot from the cache (Table II's baseline), beside the trained rows
    compare: str | None = None  # a row the others are compared with (report/compare.py)
    path: Path | None = None


def load_table(name_or_path: str | Path) -> TableRecipe:
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
        rows = tuple((r.pop("name"), r) for r in (dict(r) for r in data["rows"]))
        given = {k: data[k] for k in ("seeds", "level", "reference", "presets",
                                      "release_row", "compare") if k in data}
        if "figures" in data:
            given["figures"] = tuple(data["figures"])
        table = TableRecipe(name=data.get("name", path.stem), model=data["model"], rows=rows,
                            path=path, **given)
    except (KeyError, TypeError, tomllib.TOMLDecodeError) as e:
        raise QamroError(f"{path}: not a table recipe ({e})") from None
    if table.level not in ("system", "utterance") or \
            not set(table.figures) <= {*FIGURES, *TOP_FIGURES}:
        raise QamroError(f"{path}: level must be system or utterance, figures among "
                         f"{', '.join((*FIGURES, *TOP_FIGURES))}")
    check_seeds(table.seeds)
    if table.compare is not None and table.compare not in [r for r, _ in table.rows]:
        raise QamroError(f"{path}: compare = {table.compare!r} names no row")
    return table
