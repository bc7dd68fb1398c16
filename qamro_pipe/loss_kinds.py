"""The loss kinds: one table that every user of a kind reads (the engine, the settings checks,
sweeps, run names, member labels, plots and --help).

Adding a kind touches its term (train/listwise.py registers listwise terms by name), this
table and its tests. A kind's family says how the engine scores it:
- "pair": the pair hinge of train/losses.py (QAMRO, L_MR);
- "list": a listwise term of train/listwise.py (`LIST_TERMS[name]`);
- "distribution": the Gaussian-KL head output of train/distribution.py;
- "system": the system-level soft Spearman of train/system_level.py (per-system means of a
  batch), which any other kind may also add beside its own term (LossConfig.system_weight);
- "none": regression only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

FAMILIES = ("pair", "list", "distribution", "system", "none")


@dataclass(frozen=True)
class LossKind:
    name: str  # what --loss takes and config.json records
    family: str  # how the engine scores it (module docstring)
    settings: tuple[str, ...]  # the LossConfig fields it reads; giving another is refused
    legend: str  # how a plot's legend and the tables name it
    member: str  # a member's label: str.format over its LossConfig's fields
    folder: str  # how default run-folder names call it (experiments/naming.py)
    grid: tuple[str, ...] = ()  # the settings a sweep grid multiplies its points by
    needs_label_range: bool = False  # its bins or normalisation need the labels' scale
    symbols: Mapping[str, str] | None = None  # legend symbols of its settings (alpha -> α)
    about: str = ""  # what --help says of it


KINDS: dict[str, LossKind] = {k.name: k for k in (
    LossKind("qamro", "pair", ("alpha", "beta", "norm", "quality_weight"), "QAMRO",
             "qamro a={alpha:g} b={beta:g}", "qamro",
             grid=("alpha", "beta"), symbols={"alpha": "α", "beta": "β"}, about="the paper"),
    LossKind("mr", "pair", ("margin",), "L_MR", "mr m={margin:g}", "mr",
             grid=("margin",), symbols={"margin": "margin"}, about="fixed margin"),
    LossKind("listnet", "list", ("temperature",), "ListNet", "listnet T={temperature:g}",
             "listnet", about="listwise"),
    LossKind("listmle", "list", (), "ListMLE", "listmle", "listmle", about="listwise"),
    LossKind("spearman", "list", ("tau",), "Spearman", "spearman tau={tau:g}", "spearman",
             about="soft-rank"),
    LossKind("gaussian-kl", "distribution", ("bins", "sigma"), "Gaussian KL",
             "gaussian-kl bins={bins} sigma={sigma:g}", "gaussian-kl",
             needs_label_range=True, about="distributional"),
    LossKind("system", "system", ("tau",), "System Spearman", "system tau={tau:g}",
             "system", about="system-level soft-rank"),
    LossKind("none", "none", (), "regression only", "none", "baseline",
             about="regression only"),
)}
LOSS_KINDS = tuple(KINDS)  # --loss's choices, in the order legends and tables show them
USED_SETTINGS = {k.name: k.settings for k in KINDS.values()}
GRID_SETTINGS = tuple(dict.fromkeys(s for k in KINDS.values() for s in k.grid))  # alpha, ...


def kinds_of(family: str) -> tuple[str, ...]:
    return tuple(k.name for k in KINDS.values() if k.family == family)


def uses_system_term(loss: Any) -> bool:
    """Whether a member's objective has the system-level term: its kind, or beside its kind
    (LossConfig.system_weight)."""
    return KINDS[loss.kind].family == "system" or bool(getattr(loss, "system_weight", 0))


def kinds_help() -> str:
    """The kinds as --help lists them: 'qamro (the paper), mr (fixed margin), ...'."""
    return ", ".join(f"{k.name} ({k.about})" if k.about else k.name for k in KINDS.values())


def member_label(loss: Any, seed: int) -> str:
    """'qamro a=0.2 b=7 seed=0': a member as screens, logs and metrics.json name it; what a
    member adds to its kind follows it: 'qamro a=0.2 b=7 +system 0.5 batches=prompt'."""
    return f"{KINDS[loss.kind].member.format(**vars(loss))}{_extras(loss, ' ')} seed={seed}"


def _extras(loss: Any, sep: str) -> str:
    """The settings any kind may take beside its own, where not at their defaults: the
    system-level term's weight, the preference pairs' weight, structured batches, learned
    term weights, the pool."""
    out = []
    if getattr(loss, "system_weight", 0):
        out.append(f"+system {loss.system_weight:g}" if sep == " "
                   else f"system{loss.system_weight:g}")
    if getattr(loss, "regression_weight", 1.0) != 1.0:
        out.append(f"regression×{loss.regression_weight:g}" if sep == " "
                   else f"regw{loss.regression_weight:g}")
    if getattr(loss, "pair_weight", 0):  # preference pairs (train/pairs_term.py)
        out.append(f"+pairs {loss.pair_weight:g}" if sep == " " else f"pairs{loss.pair_weight:g}")
    if getattr(loss, "batch_by", "random") != "random":
        out.append(f"batches={loss.batch_by}" if sep == " " else f"by-{loss.batch_by}")
    if getattr(loss, "loss_weighting", "fixed") != "fixed":
        out.append(f"weights={loss.loss_weighting}" if sep == " " else loss.loss_weighting)
    if getattr(loss, "pool", "mean") != "mean":
        out.append(f"pool={loss.pool}" if sep == " " else f"pool-{loss.pool}")
    return "".join(sep + x for x in out)


def legend(kind: str, values: Mapping[str, Any], skip: tuple = ()) -> str:
    """A loss setting as a legend reads it ('QAMRO α=0.2 β=7'); `skip` leaves out the setting
    on the x axis, None values are left out."""
    k = KINDS.get(kind, KINDS["none"])
    parts = [f"{k.symbols[s]}={values[s]:g}" for s in k.grid
             if s not in skip and values.get(s) is not None]
    return " ".join([k.legend, *parts])


def setting_order(x) -> float:
    """Sort key for a row's grid setting: numeric, a kind's unused ones (None) first."""
    return float("-inf") if x is None else x
