"""`qamro-pipe export RUN OUT`: a model folder that needs nothing else (model_folder.py).

config.json holds what `Scorer.load` needs (the run's heads, settings, label statistics and
the members kept, the extraction settings of each backbone) and what a reader needs: the
backbone's weights file (name, sha256, where to fetch it, its licence), the labels and their
range, what it was trained on, the run's metrics. Paths of the machine it was trained on are
left out. model.safetensors holds every kept member's head weights; README.md is the card."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import __version__
from .errors import QamroError
from .extract.backbones import get_backbone
from .extract.backbones.base import RANDOM_WEIGHTS
from .model_folder import MODEL_VERSION, is_model_folder
from .preference import read_calibration, write_calibration
from .report.evaluate import TrainedRun, scoring_rule, select_members
from .train.runs import publish, staging

# the published licence of each backbone's weights, as its package ships it (checked in the
# installed distributions' metadata: audiobox-aesthetics 0.0.4 "Attribution 4.0
# International", muq 0.1.0 LICENSE_weights CC-BY-NC 4.0, laion-clap 1.1.7 CC0 1.0)
WEIGHTS_LICENCE = {
    "clap-music": "CC0 1.0 (LAION-CLAP; see the model card of lukewys/laion_clap)",
    "aesthetics": "CC-BY 4.0 (facebookresearch/audiobox-aesthetics)",
    "muq": "CC-BY-NC 4.0, non-commercial (OpenMuQ/MuQ-large-msd-iter, LICENSE_weights)",
    "melstats": "none: log-mel statistics, no weights",
}
_RUN_KEYS = ("recipe", "backbone", "dataset", "cache_key", "cache_rows", "label_names",
             "heads", "train", "label_stats", "validation", "rows", "versions", "release")


def check_target(out: Path, force: bool) -> None:
    """Before any work: OUT is new, an empty folder, or (with --force) a model folder this
    tool exported; never anything else."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise QamroError(f"{out}: a file is there, not a model folder; choose another OUT")
    if not any(out.iterdir()):
        return
    if not is_model_folder(out):
        raise QamroError(f"{out}: a folder qamro-pipe did not export (no config.json with "
                         f"qamro_model_version); refusing to replace it; choose another OUT")
    if not force:
        raise QamroError(f"{out}: model folder exists; choose another OUT or pass --force to "
                         f"replace it")


def export_model(run: str | Path, out: str | Path, members: str | None = None,
                 force: bool = False) -> tuple[Path, dict[str, Any]]:
    """Write the model folder OUT of run RUN (its members, or those `members` selects), whole
    or not at all. -> (OUT, its config)"""
    from safetensors.torch import save_file

    out = Path(out)
    check_target(out, force)
    tr = TrainedRun(run)
    if tr.config.get("cv_fold"):
        raise QamroError(f"{tr.path}: one fold of a cross-validation, trained without its "
                         f"held-out clips; export a run trained on all the data")
    picked, selection = select_members(tr.config, tr.members, members)
    kept = [tr.members[i] for i in picked]
    config = model_config(tr, kept, selection)
    tensors = {}
    for key, t in tr._tensors.items():  # members renumbered 0..K-1, as config.json lists them
        head, member, name = _split_key(key)
        if member in kept:
            tensors[f"{head}/m{kept.index(member)}/{name}"] = t
    tmp = staging(out)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
    save_file(tensors, str(tmp / "model.safetensors"),
              metadata={"qamro_model_version": str(MODEL_VERSION)})
    (tmp / "README.md").write_text(model_card(config))
    fitted = read_calibration(tr.path, selection)
    if fitted:  # the run's temperature for these members is the folder's for all of them
        write_calibration(tmp, None, fitted)
    return publish(tmp, out), config


def _split_key(key: str) -> tuple[str, int, str]:
    """"overall/m3/net.0.weight" -> ("overall", 3, "net.0.weight")"""
    head, member, name = key.split("/", 2)
    return head, int(member[1:]), name


def _portable(cache_config: dict[str, Any] | None) -> dict[str, Any]:
    """A cache's config without this machine's paths: the weights are found by their
    release (or the user's --checkpoint) and checked by sha256 on load."""
    cfg = json.loads(json.dumps(cache_config or {}))
    ext = cfg.get("extract", {})
    if ext.get("checkpoint") != RANDOM_WEIGHTS:
        ext["checkpoint"] = None
    ext["tokenizer_dir"] = None
    cfg.get("provenance", {}).pop("checkpoint_path", None)
    return cfg


def _weights(backbone: str, cache_config: dict[str, Any]) -> dict[str, Any]:
    name = backbone.split("@")[0]
    prov = (cache_config or {}).get("provenance", {})
    rel = get_backbone(name).release  # building one costs nothing: no weights, no imports
    entry = {"backbone": backbone, "file": prov.get("checkpoint"),
             "sha256": prov.get("checkpoint_sha256"),
             "licence": WEIGHTS_LICENCE.get(name, "see the weights' own model card")}
    if rel is not None:
        entry.update(repo=rel.repo, revision=rel.revision, release_file=rel.filename,
                     fetch=rel.url, companions=list(rel.companions))
    return entry


def model_config(tr: TrainedRun, kept: list[int], selection: str | None) -> dict[str, Any]:
    c = tr.config
    config = {k: c[k] for k in _RUN_KEYS if k in c}
    config["qamro_model_version"] = MODEL_VERSION
    config["cache"] = Path(c["cache"]).name
    config["cache_config"] = _portable(c.get("cache_config"))
    config["feature_caches"] = [{**s, "path": Path(s["path"]).name,
                                 "cache_config": _portable(s.get("cache_config"))}
                                for s in c.get("feature_caches", [])]
    config["members"] = [c["members"][k] for k in kept]
    label_range = (c.get("cache_config") or {}).get("label_range")
    config["labels"] = {"names": [h["label"] for h in c["heads"]], "range": label_range}
    config["backbone_weights"] = [_weights(c["backbone"], c.get("cache_config"))] + \
        [_weights(s["backbone"], s.get("cache_config")) for s in c.get("feature_caches", [])]
    key = c.get("cache_key", {})
    config["extraction"] = {k: key.get(k) for k in ("sample_rate", "window_seconds",
                                                     "precision", "resampler", "downmix",
                                                     "audio_input") if k in key}
    config["trained_on"] = {"dataset": c.get("dataset"), "cache": Path(c["cache"]).name,
                            "cache_rows_sha256": c.get("cache_rows"),
                            "eval_split": c["train"].get("eval_split"),
                            "validation": c.get("validation"), "rows": c.get("rows")}
    config["metrics"] = _metrics(tr.path, kept)
    config["exported"] = {"from": str(tr.path), "qamro-pipe": __version__,
                          "members": selection,
                          "scored": scoring_rule(c, kept)["text"]}
    return config


def _metrics(run: Path, kept: list[int]) -> dict[str, Any]:
    """The run's figures on its eval split: per head the mean over all its members (with
    the sd over them), and each kept member's own, with 95% intervals at system level."""
    try:
        m = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"eval_split": m.get("eval_split"), "validation": m.get("validation"),
            "heads": m.get("heads", {}),
            "members": [m["members"][k] for k in kept if k < len(m.get("members", []))]}


def model_card(config: dict[str, Any]) -> str:
    """README.md: intended use, data, the metrics table with intervals, limitations, and
    the backbone weights' licence."""
    heads = [h["name"] for h in config["heads"]]
    lo_hi = config["labels"]["range"]
    scale = f"on a {lo_hi[0]:g} to {lo_hi[1]:g} scale" if lo_hi else "on the labels' scale"
    dataset = config["trained_on"]["dataset"]
    synthetic = dataset == "demo"
    lines = [
        "---", "library_name: qamro-pipe", "tags: [audio, music, quality-assessment, mos]",
        "---", f"# {config.get('recipe', 'qamro-pipe')} quality predictor", "",
        f"Predicts how people rate generated audio ({', '.join(heads)}) {scale}, from frozen "
        f"{config['backbone']} features and small MLP heads trained with the QAMRO ranking "
        f"loss (qamro-pipe {config['exported']['qamro-pipe']}). A score is "
        f"{config['exported']['scored']}.", "",
        "## Intended use", "",
        "Scoring generated clips (text-to-music, text-to-audio, text-to-speech) for "
        "evaluation, checkpoint selection, top-k selection among candidates, and A-versus-B "
        "preference (P(A preferred over B) from the score difference). Not a judge of "
        "single clips far from the training data.", "",
        "```python", "from qamro_pipe import Scorer",
        "scorer = Scorer.load(\"THIS_FOLDER_OR_owner/name\")",
        "rows = scorer.score([\"clip1.wav\", \"clip2.wav\"], text=\"calm piano\")", "```", "",
        "or `qamro-pipe predict THIS_FOLDER clip1.wav clip2.wav`.", "",
        "## Data", "",
        f"Trained on dataset `{dataset}` (cache `{config['trained_on']['cache']}`, rows "
        f"sha256 `{str(config['trained_on']['cache_rows_sha256'])[:16]}...`); rows used: "
        f"{json.dumps(config['trained_on']['rows'])}; validation: "
        f"{config['trained_on']['validation']}; figures below are on split "
        f"`{config['trained_on']['eval_split']}`.", "",
        "## Metrics", "", *metrics_table(config), "",
        "## Backbone and extraction", "",
        *[f"- `{w['backbone']}`: weights `{w['file']}` (sha256 `{w['sha256']}`)"
          + (f", fetch {w['fetch']}" if w.get("fetch") else "") + f"; licence: {w['licence']}"
          for w in config["backbone_weights"]],
        f"- extraction: {json.dumps(config['extraction'])}", "",
        "## Limitations", "",
        "- Scores are predictions of a mean opinion on this training data's scale and raters; "
        "other genres, languages, durations or generators may score off-scale.",
        "- The interval above is over the evaluation split's systems; it is not the error of "
        "one clip's score. The members' sd (`HEAD_sd`) shows their disagreement only.",
        "- P(A over B) without a fitted temperature is set by the members' spread "
        "(docs/preference.md); fit one with `qamro-pipe prefer --calibrate` on labelled pairs.",
    ]
    if synthetic:
        lines.append("- **Trained on the SYNTHETIC demo corpus**: its scores follow designed "
                     "degradations and simulated raters, not human ratings. Do not use it to "
                     "judge real audio.")
    lines += ["", "## Licence", "",
              "The heads are yours to license. The backbone weights keep their own licence "
              "(above); using this model means using them.", ""]
    return "\n".join(lines)


def metrics_table(config: dict[str, Any]) -> list[str]:
    """Per head and level: MSE, LCC, SRCC, KTAU; one member's with the system level's 95%
    bootstrap interval, several members' as mean ± sd over them."""
    m = config.get("metrics", {})
    if not m.get("heads"):
        return ["(no metrics.json in the run)"]
    members = m.get("members", [])
    rows = ["| head | level | MSE | LCC | SRCC | KTAU |", "|---|---|---|---|---|---|"]
    for head in m["heads"]:
        for level in ("system", "utterance"):
            if len(members) == 1:
                fig = members[0].get("heads", {}).get(head, {}).get(level, {})
                cells = [_cell(fig.get(f), fig.get(f"{f}_ci")) for f in
                         ("mse", "lcc", "srcc", "ktau")]
            else:
                fig = m["heads"][head].get(level, {})
                cells = [_cell(fig.get(f), sd=fig.get(f"{f}_std")) for f in
                         ("mse", "lcc", "srcc", "ktau")]
            rows.append(f"| {head} | {level} | " + " | ".join(cells) + " |")
    note = ("one member; [95% bootstrap interval over systems]" if len(members) == 1 else
            "mean ± sd over the run's members; each member's intervals are in config.json")
    return rows + ["", f"({note})"]


def _cell(v, ci=None, sd=None) -> str:
    if v is None:
        return "n/a"
    text = f"{v:.3f}"
    if ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    if sd is not None:
        text += f" ± {sd:.3f}"
    return text


def written_note(out: Path) -> str:
    return (f"exported to {out}/: config.json, model.safetensors, README.md; load it with "
            f"Scorer.load({str(out)!r}) or `qamro-pipe predict {out} FILES`")

