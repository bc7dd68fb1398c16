"""A run folder's files checked against each other before its heads are used: a
heads.safetensors whose tensors config.json does not describe (an extra member, a foreign
key, a head of another run) would otherwise be averaged in, or fail deep in torch."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import QamroError
from ..untrusted import printable

_MEMBER = re.compile(r"m(\d+)/(.+)")  # after "HEAD/": the member index and the parameter


def check_config(run: Path, config: dict[str, Any]) -> None:
    """config.json holds the parts every reader of a run needs, with the right types."""
    where = printable(run / "config.json")
    heads, members = config.get("heads"), config.get("members")
    if not isinstance(heads, list) or not heads or not all(
            isinstance(h, dict) and isinstance(h.get("name"), str) and h["name"]
            for h in heads):
        raise QamroError(f"{where}: 'heads' must be a non-empty list of head settings, each "
                         f"with a name")
    for h in heads:
        problem = _head_problem(h)
        if problem:
            raise QamroError(f"{where}: head {printable(repr(h['name']))}: {problem}")
    names = [h["name"] for h in heads]
    if len(set(names)) != len(names):
        raise QamroError(f"{where}: two heads share a name ({', '.join(map(repr, names))})")
    if not isinstance(members, list) or not members or not all(
            isinstance(m, dict) and isinstance(m.get("loss"), dict)
            and _whole(m.get("seed", 0)) for m in members):
        raise QamroError(f"{where}: 'members' must be a non-empty list of member settings "
                         f"(a loss table and a whole-number seed each)")
    for name in ("cache", "backbone"):
        if not isinstance(config.get(name), str):
            raise QamroError(f"{where}: {name!r} must be a string (the run's cache and its "
                             f"backbone)")
    for name in ("train", "label_stats", "cache_key"):
        if name in config and not isinstance(config[name], dict):
            raise QamroError(f"{where}: {name!r} must be a JSON object")
    if not isinstance(config.get("train"), dict):
        raise QamroError(f"{where}: 'train' settings are missing")


def member_indices(run: Path, config: dict[str, Any], tensors: dict[str, Any]) -> list[int]:
    """The members whose weights heads.safetensors holds, each for every head of config.json;
    refused in one line when a tensor belongs to no head and member of config.json."""
    names = sorted((h["name"] for h in config["heads"]), key=len, reverse=True)  # longest first
    n_members = len(config["members"])
    where = printable(run / "heads.safetensors")
    held: dict[str, set[int]] = {n: set() for n in names}
    for key in tensors:
        head = next((n for n in names if key.startswith(n + "/")), None)
        m = _MEMBER.fullmatch(key[len(head) + 1:]) if head else None
        if m is None or int(m[1]) >= n_members:
            raise QamroError(f"{where}: tensor {printable(repr(key))} belongs to no head and "
                             f"member of config.json ({len(names)} head(s): "
                             f"{printable(', '.join(names))}; {n_members} member(s)): the "
                             f"folder's files are not from one run")
        held[head].add(int(m[1]))
    kept = set().union(*held.values())
    if not kept:
        raise QamroError(f"{where}: holds no weights")
    for head, have in held.items():
        if have != kept:
            raise QamroError(f"{where}: head {printable(repr(head))} has weights for members "
                             f"{sorted(have)}, the others for {sorted(kept)}: the folder's "
                             f"files are not from one run")
    return sorted(kept)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _head_problem(h: dict[str, Any]) -> str | None:
    """What in one head's settings (train/heads.py HeadSpec, as JSON) has the wrong type."""
    if not isinstance(h.get("label"), str):
        return "'label' must be a string"
    features = h.get("features")
    if not isinstance(features, list) or not features or not all(
            isinstance(f, str) for f in features):
        return "'features' must be a non-empty list of names"
    hidden = h.get("hidden")
    if hidden is not None and (not isinstance(hidden, list) or not all(
            _whole(w) and w >= 1 for w in hidden)):
        return "'hidden' must be a list of whole numbers >= 1 (or null)"
    if h.get("activation") is not None and not isinstance(h["activation"], str):
        return "'activation' must be a string (or null)"
    for flag in ("layer_norm", "layer_weights", "standardize"):
        if not isinstance(h.get(flag, False), bool):
            return f"{flag!r} must be true or false"
    return None
