"""Default run-folder names: they carry what tells two runs of one recipe apart (the backbone
of the cache, the loss kinds and settings, a sweep's grid, cross-validation), so that `train`
then `train --cv 3`, two sweeps of other grids, or a melstats and a CLAP run of one dataset
never land in one folder (which --force would then replace)."""
from __future__ import annotations

from dataclasses import fields

from ..config import CVConfig, LossConfig, Member
from ..loss_kinds import KINDS, USED_SETTINGS

# how a setting shows in a name; the kind's own settings first, as the runs were named before
SHORT = {"alpha": "a", "beta": "b", "margin": "m", "temperature": "T", "tau": "tau",
         "bins": "bins", "sigma": "sigma", "norm": "norm-", "quality_weight": "q-",
         "regression": "reg-", "system_weight": "sys", "batch_by": "by-",
         "loss_weighting": "w-", "pool": "pool-", "pair_weight": "pairs",
         "regression_weight": "regw"}
SHARED = ("norm", "quality_weight", "regression", "system_weight", "batch_by",
          "loss_weighting", "pool", "pair_weight",
          "regression_weight")  # read beside a kind's own settings
ANY_KIND = ("regression", "system_weight", "batch_by", "loss_weighting", "pool",
            "pair_weight", "regression_weight")  # every kind's


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _values(name: str, values: list) -> str:
    """One setting over the members: a1 or b1,3,5,7 (b1-11x6 when longer)."""
    vals = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    shown = ",".join(_value(v) for v in vals)
    if len(vals) > 4:
        shown = f"{_value(vals[0])}-{_value(vals[-1])}x{len(vals)}"
    return SHORT[name] + shown


def loss_part(members: list[Member], base: LossConfig) -> str:
    """The kinds, then every setting the kinds read: a kind's own settings always (qamro's
    alpha and beta), the others (norm, regression, ...) where they differ from `base`, the
    recipe's."""
    kinds = list(dict.fromkeys(m.loss.kind for m in members))
    parts = ["+".join(KINDS[k].folder for k in kinds)]
    names = [f.name for f in fields(LossConfig) if f.name in SHORT]
    for name in names:
        users = [m.loss for m in members
                 if name in USED_SETTINGS[m.loss.kind] or name in ANY_KIND]
        if not users:
            continue
        values = [getattr(loss, name) for loss in users]
        own = name not in SHARED
        if own or any(v != getattr(base, name) for v in values):
            parts.append(_values(name, values))
    return "-".join(parts)


def run_name(recipe_name: str, backbone: str, members: list[Member], base: LossConfig,
             kind: str = "run", cv: CVConfig | None = None) -> str:
    """RECIPE-BACKBONE[-sweep]-LOSS[-cvK-GROUP], e.g. musiceval-clap-music-qamro-a0.2-b7,
    demo-melstats-sweep-qamro+baseline-a0.2-b1,3,5,7,9-cv3-system."""
    name = f"{recipe_name}-{backbone.split('@')[0]}"
    name += ("-sweep-" if kind == "sweep" else "-") + loss_part(members, base)
    if cv is not None:
        name += f"-cv{cv.folds}-{cv.group}"
    return name.replace("/", "_")
