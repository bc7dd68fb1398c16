"""Experiments as data: a recipe (stages/NAME.toml) names the dataset, backbone and heads.

The paper's hyper-parameters live in config.py; a recipe only overrides what its dataset needs."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import DEFAULT_RECIPE, cache_root
from ..errors import QamroError
from .heads import HeadSpec

STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"


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

    def default_cache(self) -> Path:
        return cache_root() / self.dataset / f"{self.backbone}.h5"


def find_recipe(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    for candidate in (p, Path("stages") / f"{p}.toml", STAGES_DIR / f"{p}.toml"):
        if candidate.is_file():
            return candidate
    known = sorted(f.stem for f in STAGES_DIR.glob("*.toml")) if STAGES_DIR.is_dir() else []
    raise QamroError(f"no recipe {str(name_or_path)!r} (a .toml path, or one of: "
                     f"{', '.join(known) or 'none found'})")


def _head(h: dict[str, Any]) -> HeadSpec:
    extra = {k: (tuple(v) if isinstance(v, list) else v) for k, v in h.items()
             if k not in ("name", "label", "features")}
    return HeadSpec(name=h["name"], label=h.get("label", h["name"]),
                    features=tuple(h["features"]), **extra)


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise QamroError(f"{path}: not valid TOML: {e}") from None
    try:
        heads = tuple(_head(h) for h in data["heads"])
        lr = data.get("label_range")
        return Recipe(name=data.get("name", path.stem), dataset=data["dataset"],
                      backbone=data["backbone"], heads=heads,
                      label_range=tuple(lr) if lr else None, train=data.get("train", {}),
                      loss=data.get("loss", {}), grids=data.get("grids", {}),
                      reference=data.get("reference", {}), path=path)
    except (KeyError, TypeError) as e:  # a missing key, or an unknown head setting
        raise QamroError(f"{path}: recipe is missing or mistypes {e}") from None


def select_recipe(recipe: str | None = None, dataset: str | None = None,
                  backbone: str | None = None) -> Recipe:
    """The CLI's choice: --recipe NAME|PATH, or --dataset NAME (its recipe has that name), and
    --backbone to read that backbone's cache of the dataset instead of the recipe's."""
    r = load_recipe(recipe or dataset or DEFAULT_RECIPE)
    if dataset and r.dataset != dataset:
        raise QamroError(f"recipe {r.name!r} is for dataset {r.dataset!r}, not {dataset!r}")
    return replace(r, backbone=backbone) if backbone else r
