"""Zero-cost backbones for benchmarks (never offered to users: only benchmarks import this).

`null-clap` and `null-aesthetics` are clap-music and aesthetics with the model taken out:
the host does everything it does for the real ones (their windowing and window length,
their input built by their own `_prepare`: the repeat-padded copy for CLAP, the zero-padded
copy and lengths for Aesthetics; CLAP's texts through its tokenizer), and the forward returns
zeros of the real feature shapes at once. So `extract` with one of them measures the host
ceiling: everything but the forward.

The model's input is built on torch's "meta" device: the host still copies every window into
a host tensor (on a GPU that copy goes into pinned memory), while what a GPU would do after
the upload (CLAP's int16 round trip, Aesthetics' mask) costs nothing, as device work costs the
host nothing. The host tensor comes from a cache, as a GPU run's pinned one comes from torch's
caching host allocator: on the CPU, torch hands a large tensor back to the OS when it is
freed, and every batch would pay for faulting in fresh pages (about 1 ms per 10 s CLAP clip
here), which a GPU run does not."""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from qamro_pipe.extract.backbones.aesthetics import Aesthetics
from qamro_pipe.extract.backbones.base import register_backbone
from qamro_pipe.extract.backbones.clap import EMBED_DIM, TEXT_MAX_TOKENS, ClapMusic

DEVICE = "meta"  # where the prepared input goes: nowhere that costs the host


class PinnedCache:
    """Host tensors for the model's input, reused from batch to batch by shape and dtype, as
    torch's caching pinned-host allocator reuses a freed block once its upload is done (on
    "meta" the upload is done at once). Only the calls that ask for pinned memory or not
    (`pin_memory=...`, the input's staging tensors) are served; zeros are zeroed again."""

    def __init__(self):
        self.blocks: dict[tuple, torch.Tensor] = {}
        self.real = {"empty": torch.empty, "zeros": torch.zeros}

    def _get(self, kind: str, *shape, **kw):
        if "pin_memory" not in kw:
            return self.real[kind](*shape, **kw)
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        key = (shape, kw.get("dtype") or torch.get_default_dtype())
        if key not in self.blocks:
            self.blocks[key] = self.real["empty"](shape, dtype=key[1])
        out = self.blocks[key]
        return out.zero_() if kind == "zeros" else out

    @contextlib.contextmanager
    def serving(self):
        torch.empty = lambda *a, **k: self._get("empty", *a, **k)
        torch.zeros = lambda *a, **k: self._get("zeros", *a, **k)
        try:
            yield
        finally:
            torch.empty, torch.zeros = self.real["empty"], self.real["zeros"]


# one for the process, as torch's pinned cache is: a run after a warm-up finds it warm
HOST = PinnedCache()


class _Null:
    """Mixin: no weights to load; the input's device is DEVICE whatever the run's is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = DEVICE
        self._host = HOST

    def _prepare(self, windows):
        with self._host.serving():
            return super()._prepare(windows)

    def load(self) -> None:
        self.weights_path()  # the provenance of "random" weights, as the real load records

    def _forward(self, inputs) -> dict[str, Any]:
        n = inputs[0].shape[0] if isinstance(inputs, tuple) else inputs.shape[0]
        return {k: np.zeros((n, *s.shape), np.float32)
                for k, s in self.feature_specs().items() if not s.text}


@register_backbone
class NullClap(_Null, ClapMusic):
    name = "null-clap"

    def _embed_texts(self, texts: list[str]) -> dict[str, Any]:
        tokens = self.ensure_tokenizer()(list(texts), padding="max_length", truncation=True,
                                         max_length=TEXT_MAX_TOKENS, return_tensors="pt")
        return {"text": np.zeros((len(tokens["input_ids"]), EMBED_DIM), np.float32)}


@register_backbone
class NullAesthetics(_Null, Aesthetics):
    name = "null-aesthetics"
