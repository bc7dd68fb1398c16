"""The roberta-base tokenizer CLAP's text tower reads: found, fetched at a pinned revision,
hashed and loaded, without ever waiting on a network that is not there.

Looked for in order: `--tokenizer-dir`; an earlier download in weights_dir(); the Hugging
Face cache at the pinned revision; then, when the endpoint answers, a download of the files
into weights_dir(). Whatever folder is used, the sha256 of every tokenizer file in it goes
into the cache's provenance and key: other files would give other text features.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ...checkpoints import sha256_file
from ...errors import QamroError
from .releases import PublishedWeights, hub_endpoint, hub_offline, hub_reachable

# roberta-base (FacebookAI/roberta-base, formerly "roberta-base") at commit e2da8e2f, the
# revision other projects pin it at; RobertaTokenizer builds its BPE from vocab.json, merges.txt
TOKENIZER = PublishedWeights("FacebookAI/roberta-base",
                             "e2da8e2f811d1448a5b465c236feacd80ffbac7b",
                             "vocab.json")
REPO_ALIASES = ("FacebookAI/roberta-base", "roberta-base")  # names the HF cache may hold
REQUIRED = ("vocab.json", "merges.txt")
# read by transformers when a folder has them, so they count as the tokenizer's files too
OPTIONAL = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json")
VOCAB_SIZE = 50265  # roberta-base's vocabulary, <mask> last


def find_tokenizer(tokenizer_dir: str | None, offline: bool) -> tuple[Path | None, str | None]:
    """(folder with the tokenizer files, None), or (None, why there is none)."""
    if tokenizer_dir:
        folder = Path(tokenizer_dir).expanduser()
        if not folder.is_dir():
            raise QamroError(f"--tokenizer-dir {folder}: no such folder")
        return folder, None
    local = TOKENIZER.local_path.parent
    if all((local / f).is_file() for f in REQUIRED):
        return local, None
    cached = _in_hf_cache()
    if cached is not None:
        return cached, None
    if offline:
        return None, f"offline, and none in {local} or the Hugging Face cache"
    if not hub_reachable():
        return None, f"{hub_endpoint()} did not answer (no network?)"
    from huggingface_hub import hf_hub_download

    try:
        for f in REQUIRED:
            hf_hub_download(TOKENIZER.repo, f, revision=TOKENIZER.revision, local_dir=local)
    except Exception as e:  # huggingface_hub raises a dozen types, by case
        return None, f"download failed: {str(e).splitlines()[0]}"
    return local, None


def _in_hf_cache() -> Path | None:
    """The snapshot folder of the pinned revision in the Hugging Face cache, if it holds the
    files (a user of transformers often has it); looked up on disk only."""
    from huggingface_hub import try_to_load_from_cache

    for repo in REPO_ALIASES:
        found = [try_to_load_from_cache(repo, f, revision=TOKENIZER.revision) for f in REQUIRED]
        if all(isinstance(p, str) for p in found):
            folders = {Path(p).parent for p in found}
            if len(folders) == 1:
                return folders.pop()
    return None


def tokenizer_files(folder: Path) -> dict[str, str]:
    """{file name: sha256} of the tokenizer files in `folder`."""
    return {f: sha256_file(folder / f) for f in (*REQUIRED, *OPTIONAL) if (folder / f).is_file()}


def files_digest(files: dict[str, str]) -> str:
    """One sha256 naming a set of files by their names and contents."""
    lines = "".join(f"{name} {sha}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def load_tokenizer(folder: Path) -> Any:
    """transformers' RobertaTokenizer from a local folder (never the network), checked to be
    roberta-base's."""
    from transformers import RobertaTokenizer

    try:
        with hub_offline():
            tok = RobertaTokenizer.from_pretrained(str(folder), local_files_only=True)
        problem = roberta_vocab_problem(tok.get_vocab())
    except Exception as e:  # transformers raises OSError/ValueError/... by case
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    if problem:
        raise QamroError(f"clap-music: no usable roberta-base tokenizer in {folder} "
                         f"({problem}); the folder needs its vocab.json and merges.txt (or "
                         f"tokenizer.json)")
    return tok


def roberta_vocab_problem(vocab: dict[str, int]) -> str | None:
    """What is wrong with a tokenizer's vocabulary for roberta-base, or None. Needed because
    transformers 5 builds a 5-token tokenizer, silently, when the vocabulary files are
    missing; every word would become <unk>."""
    expected = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": VOCAB_SIZE - 1}
    if len(vocab) != VOCAB_SIZE:
        return f"{len(vocab)} tokens instead of {VOCAB_SIZE}"
    wrong = {k: vocab.get(k) for k, v in expected.items() if vocab.get(k) != v}
    return f"special tokens at other ids: {wrong}" if wrong else None


def missing_tokenizer(why: str) -> QamroError:
    return QamroError(
        f"clap-music: text features need the roberta-base tokenizer, which is not available "
        f"({why}). Download vocab.json and merges.txt from "
        f"https://huggingface.co/{TOKENIZER.repo}/tree/{TOKENIZER.revision} into a folder and "
        f"pass --tokenizer-dir DIR, or run once online; audio-only extraction (no texts) "
        f"needs no tokenizer")
