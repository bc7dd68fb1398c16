"""Exported model folders (`qamro-pipe export`): where one is, and reading it.

A model folder is laid out as a Hugging Face model repository: config.json (the run's
settings, the backbone and what it was trained on), model.safetensors (every member's head
weights) and README.md (the model card). It is found on disk, or as `owner/name` (optionally
`owner/name@REVISION`) in the Hugging Face cache, fetched once at that revision when online.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import QamroError

MODEL_VERSION = 1
MODEL_FILES = ("config.json", "model.safetensors", "README.md")
OPTIONAL_FILES = ("preference.json",)  # a fitted A-versus-B temperature (preference.py)
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_model_folder(path: Path) -> bool:
    """Whether `path` holds an exported model: its config.json carries qamro_model_version."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(config, dict) and "qamro_model_version" in config


def looks_like_repo(name: str) -> bool:
    """`owner/name` or `owner/name@REVISION` that is not a path on this machine."""
    return bool(_REPO.match(name)) and not Path(name).exists() and not name.startswith(".")


def resolve(source: str | Path, revision: str | None = None,
            offline: bool | None = None) -> Path:
    """The folder to load: `source` itself when it exists, else a Hugging Face repository
    `owner/name[@REVISION]`, read from the local cache and fetched once (at REVISION,
    default main) only when it is not there and the network is allowed."""
    path = Path(source).expanduser()
    if path.exists() or not looks_like_repo(str(source)):
        if not path.exists():
            raise QamroError(f"{source}: no such run or model folder (a Hugging Face "
                             f"model is named owner/name)")
        return path
    repo, _, rev = str(source).partition("@")
    return _snapshot(repo, revision or rev or "main", offline)


def _snapshot(repo: str, revision: str, offline: bool | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .extract.backbones.releases import hub_endpoint, hub_reachable, offline_mode

    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now: the hub reads it at import
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as e:  # huggingface_hub raises a dozen types, by case
        raise QamroError(f"{repo}@{revision}: the Hugging Face cache holds it but it cannot "
                         f"be read ({str(e).splitlines()[0]})") from None
    fetch = ("run once online, or download the repository's files (config.json, "
             "model.safetensors, README.md) into a folder and load that folder")
    if offline_mode(offline):
        raise QamroError(f"{repo}@{revision}: not in the Hugging Face cache and downloads are "
                         f"off (offline): {fetch}")
    if not hub_reachable():
        raise QamroError(f"{repo}@{revision}: not in the Hugging Face cache and "
                         f"{hub_endpoint()} did not answer (no network?): {fetch}")
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=[*MODEL_FILES, *OPTIONAL_FILES]))
    except Exception as e:
        raise QamroError(f"{repo}@{revision}: could not download it "
                         f"({str(e).splitlines()[0]})") from None


def read_model(folder: Path) -> tuple[dict[str, Any], dict]:
    """config.json and the head weights of an exported model folder (safetensors: nothing is
    unpickled), refused with one line when a file is missing or of another version."""
    from safetensors.torch import load_file

    missing = [f for f in MODEL_FILES[:2] if not (folder / f).is_file()]
    if missing:
        raise QamroError(f"{folder}: incomplete model folder (missing {', '.join(missing)})")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # (nested too deeply)
        raise QamroError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    if config.get("qamro_model_version") != MODEL_VERSION:
        raise QamroError(f"{folder}: model folder version {config.get('qamro_model_version')!r}"
                         f", this qamro-pipe reads version {MODEL_VERSION}")
    try:
        return config, load_file(str(folder / "model.safetensors"))
    except Exception as e:  # safetensors raises its own error type for any malformed file
        raise QamroError(f"{folder / 'model.safetensors'}: not a valid safetensors file "
                         f"({str(e).splitlines()[0]})") from None
