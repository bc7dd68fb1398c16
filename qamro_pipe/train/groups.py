"""Structured batches (--batch-by): which training rows share a mini-batch.

- "random": each member's own shuffle of the rows (shuffle.member_permutations), as before;
- "prompt": whole prompt groups (every system's clip of one prompt) in a random order,
  rows in a random order inside each group, so a batch holds whole prompts: the pair and
  list losses compare clips made from the same text;
- "system": whole systems likewise: the pair and list losses compare clips of one system.

The order is cut into batches of --batch-size as the random one is, so a group meets the
batch boundary at most once at each end of a batch: every batch holds whole groups but for
the (at most) two it shares with its neighbours; groups larger than a batch are split.
Both orders are counter-based (shuffle.py): a member's order depends only on its seed, the
epoch and the groups, so a resumed run continues the same sequence and a member of a sweep
is batched exactly as the single run with its seed. The setting is a member's
(LossConfig.batch_by): members of one run may differ by it, each computing its own order
(a second stable sort of [K, n] keys per epoch where some member groups)."""
from __future__ import annotations

import re

import numpy as np
import torch

from ..errors import QamroError
from ..store.reader import Cache
from .shuffle import grouped_permutations, member_permutations

PROMPT_IN_ID = re.compile(r"_(P\d+)$")  # MusicEval: <prefix>-S<system>_P<prompt>
SINGLE = "\x00clip "  # prefix of the group of a clip without a system: a group of its own


def group_keys(cache: Cache, rows: np.ndarray, group: str, option: str = "--cv-group",
               purpose: str = "to cross-validate") -> np.ndarray:
    """Each row's group: its system, or its prompt (the _P<n> that ends a MusicEval clip id,
    else the clip's text), or the clip itself ("clip": plain K-fold). A clip without a system
    is a group of its own (AES-Natural's train and dev lists have none; its eval set has 36
    systems); a clip without a prompt is refused, as grouping by prompt is then not what it
    says. `option` and `purpose`: what a refusal names."""
    if group == "clip":  # each clip a group of its own
        return cache.ids[rows].astype(str)
    if group == "system":
        keys = cache.systems[rows].astype(object)
        if (keys == "").all():
            raise QamroError(f"{cache.path}: {option} system: no clip {purpose} has a "
                             f"system; give the clips a system column, or use {option} "
                             f"clip (groups of single clips)"
                             + _other_group(cache, rows, option))
        none = keys == ""
        keys[none] = [SINGLE + str(cache.ids[i]) for i in rows[none]]
        return keys.astype(str)
    texts = cache.texts if cache.texts is not None else np.full(len(cache.ids), "")
    keys = np.array([m[1] if (m := PROMPT_IN_ID.search(str(cache.ids[i]))) else texts[i]
                     for i in rows], dtype=object)
    missing = rows[keys == ""]
    if len(missing):
        raise QamroError(f"{cache.path}: {option} prompt: {len(missing)} clip(s) have no "
                         f"prompt (neither _P<n> ending its id nor a text), e.g. "
                         f"{cache.ids[missing[0]]!r}; give the clips a text column, or use "
                         f"{option} clip (groups of single clips)"
                         + _other_group(cache, rows, option, "system"))
    return keys.astype(str)


def _other_group(cache: Cache, rows: np.ndarray, option: str, other: str = "prompt") -> str:
    """The refusal's other way out, only where it would work: grouping by `other`."""
    if other == "system":
        return f", or {option} system" if (cache.systems[rows] != "").any() else ""
    texts = cache.texts if cache.texts is not None else np.full(len(cache.ids), "")
    prompted = all(PROMPT_IN_ID.search(str(cache.ids[i])) or texts[i] for i in rows)
    return f", or {option} prompt" if prompted else ""


def train_groups(cache: Cache, clip_rows: np.ndarray, clip_of: np.ndarray | None,
                 by: str) -> np.ndarray | None:
    """[n] int64 group of each training unit (a clip, or a window: its clip's group), the
    groups numbered in order of first appearance; None for "random"."""
    if by == "random":
        return None
    keys = group_keys(cache, np.asarray(clip_rows), by, "--batch-by", "to train on")
    _, first, codes = np.unique(keys, return_index=True, return_inverse=True)
    codes = np.argsort(np.argsort(first))[codes]  # numbered by first appearance, not by name
    per_clip = np.full(len(cache.ids), -1, dtype=np.int64)
    per_clip[clip_rows] = codes
    return per_clip if clip_of is None else per_clip[clip_of]


def epoch_order(seeds: torch.Tensor, epoch, n: int, groups: dict[str, torch.Tensor],
                batched_by: dict[str, torch.Tensor]) -> torch.Tensor:
    """[K] seeds -> [K, n] each member's order of the n training units this epoch: the
    random shuffle, or for the members batched by a grouping ([K] bool `batched_by[by]`)
    the grouped order of `groups[by]` ([n] group of each unit)."""
    order = member_permutations(seeds, epoch, n)
    for by, g in groups.items():
        order = torch.where(batched_by[by][:, None], grouped_permutations(seeds, epoch, g),
                            order)
    return order
