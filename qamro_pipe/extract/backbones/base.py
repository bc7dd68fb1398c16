"""The plumbing every backbone shares: device, precision, inference mode, numpy out.

A backbone file implements `load()`, `_prepare()` (windows -> the model's input, on the
device) and `_forward()` (that input -> features) and, when it reads text, `_embed_texts()`;
nothing heavy is imported or loaded before `load()`.

Work is started and collected apart (`embed_windows_async` -> `Pending.result()`), so
extraction can prepare and launch batch N+1 on the host while the device still computes
batch N: on a GPU, features come back through pinned memory and a CUDA event, without
blocking the host until they are needed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...checkpoints import check_checkpoint_file, check_safetensors_file, sha256_file
from ...errors import QamroError
from .releases import (
    NETWORK_PROBE_SECONDS,
    RANDOM_WEIGHTS,
    PublishedWeights,
    hub_endpoint,
    hub_reachable,
    offline_mode,
)

REGISTRY: dict[str, type["Backbone"]] = {}


def register_backbone(cls: type["Backbone"]) -> type["Backbone"]:
    """Class decorator: register under `name` (the latest) and `name@version`."""
    REGISTRY[cls.name] = cls
    REGISTRY[f"{cls.name}@{cls.version}"] = cls
    return cls


def get_backbone(name: str, **options: Any) -> "Backbone":
    """A backbone of the registry (filled by the package face, extract/backbones/__init__)."""
    if name not in REGISTRY:
        known = sorted(k for k in REGISTRY if "@" not in k)
        raise QamroError(f"unknown backbone {name!r}; known: {', '.join(known)}")
    return REGISTRY[name](**options)


@contextlib.contextmanager
def seeded_init(seed: int = 0):
    """Build models under a fixed seed without touching the caller's torch RNG: random
    weights are reproducible and constructing a backbone leaves global state as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class FeatureSpec:
    shape: tuple[int, ...]  # shape of one row
    per_window: bool = False  # True: one row per window (/windows/...); False: one per clip
    text: bool = False  # made by embed_texts from the clips' texts, not from their audio


class Backbone:
    name: ClassVar[str]  # registry name, e.g. "clap-music"
    version: ClassVar[int]  # bump whenever the numbers written would change
    sample_rate: ClassVar[int]  # audio is resampled to this before embed
    resampler: ClassVar[str] = "soxr"  # how: as the publisher's own file loading does
    # (extract/audio.py RESAMPLERS); part of the cache key
    window_seconds: ClassVar[float]  # long clips are cut into windows of this length
    uses_text: ClassVar[bool] = False  # whether embed_texts produces features
    release: ClassVar[PublishedWeights | None] = None  # the published weights; None: no weights
    # how audio reaches the model: "resampled" to sample_rate and cut into windows, or also
    # "published": the file's own samples, its first window_samples, read as if at
    # sample_rate (what clap-music's published users did; their caches are keyed apart)
    audio_inputs: ClassVar[tuple[str, ...]] = ("resampled",)
    weights_format: ClassVar[str] = "torch"  # "torch" (torch.save) or "safetensors"

    def __init__(self, checkpoint: str | None = None, device: str = "cpu",
                 precision: str = "fp32", offline: bool | None = None,
                 tokenizer_dir: str | None = None, audio_input: str = "resampled",
                 keep_windows: bool = False):
        if precision not in ("fp32", "bf16", "fp16"):
            raise QamroError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")
        if audio_input not in self.audio_inputs:
            takes = sorted(n for n, c in REGISTRY.items()
                           if "@" not in n and audio_input in c.audio_inputs)
            raise QamroError(f"--clap-input {audio_input}: the {self.name} backbone takes "
                             f"{', '.join(self.audio_inputs)} only ({audio_input} is for "
                             f"{', '.join(takes) or 'no backbone'})")
        self.audio_input = audio_input
        self.keep_windows = keep_windows
        self.checkpoint = checkpoint
        self.device = device
        self.precision = precision
        self.offline = offline_mode(offline)
        self.tokenizer_dir = tokenizer_dir
        self.loaded = False
        self._provenance: dict[str, Any] = {}
        self._weights: tuple[Path | None] | None = None  # resolved once: (path or None,)

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def window_samples(self) -> int:
        return int(round(self.sample_rate * self.window_seconds))

    @property
    def decode_rate(self) -> int | None:
        """The rate clips are decoded at: sample_rate, or None (the published input) for the
        file's own rate, unresampled."""
        return None if self.audio_input == "published" else self.sample_rate

    @property
    def max_frames(self) -> int | None:
        """The published input keeps a clip's first window_samples samples; else all."""
        return self.window_samples if self.audio_input == "published" else None

    def input_key(self) -> dict[str, Any]:
        """What the cache key adds for an input other than the resampled one (nothing for it,
        so caches made before this option keep their key)."""
        if self.audio_input == "resampled":
            return {}
        return {"audio_input": self.audio_input, "resampler": "none",
                "input_frames": self.window_samples}

    def feature_specs(self) -> dict[str, FeatureSpec]:
        raise NotImplementedError

    def window_features(self) -> tuple[str, ...]:
        """The features written one row per window: the per-window ones, and with
        keep_windows each audio feature also pooled per clip (its windows' rows kept beside
        the pooled row, for attention pooling)."""
        return tuple(k for k, s in self.feature_specs().items()
                     if s.per_window or (self.keep_windows and not s.text))

    def load(self) -> None:
        """Build the model and read its weights, once (a loaded backbone stays loaded)."""
        if not self.loaded:
            self._load()
            self.loaded = True

    def _load(self) -> None:
        """Each backbone's own: build the model on self.device and read its weights."""
        raise NotImplementedError

    def _prepare(self, windows: list[np.ndarray]) -> Any:
        """Windows -> the model's input, on the device. Must copy what it needs: the caller
        may reuse the windows' memory as soon as `embed_windows_async` returns."""
        raise NotImplementedError

    def _forward(self, inputs: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _embed_texts(self, texts: list[str]) -> dict[str, Any]:
        return {}

    def provenance(self) -> dict[str, Any]:
        """JSON-plain description of what produces the numbers; the cache key."""
        return {"backbone": self.key, "sample_rate": self.sample_rate,
                "window_seconds": self.window_seconds, "precision": self.precision,
                **self.input_key(), **self._provenance}

    def identity(self, texts: bool = False) -> dict[str, str]:
        """What, besides the code, decides the numbers: {"weights": "sha256:<file's>"} for a
        checkpoint (a release file is resolved, downloaded if need be, and hashed first),
        "random" for RANDOM_WEIGHTS, "none" for a backbone without weights. Backbones that
        read other files for text features add theirs when `texts`."""
        if self.release is None:
            if self.checkpoint not in (None, RANDOM_WEIGHTS):
                raise QamroError(f"{self.name} has no weights: --checkpoint "
                                 f"{self.checkpoint} does not apply to it")
            return {"weights": "none"}
        path = self.weights_path()
        if path is None:
            return {"weights": RANDOM_WEIGHTS}
        out = {"weights": f"sha256:{self._provenance['checkpoint_sha256']}"}
        if self.release.companions:  # a model's config decides the numbers as its weights do
            out["companions"] = {k: f"sha256:{v}"
                                 for k, v in self._provenance["companions_sha256"].items()}
        return out

    # -- shared plumbing -------------------------------------------------------------
    def weights_path(self) -> Path | None:
        """The checkpoint file to load (None for RANDOM_WEIGHTS), resolved once: its name and
        sha256 go into the provenance, and cheap checks refuse the usual wrong files."""
        if self._weights is None:
            path = self._resolve_checkpoint()
            if path is None:
                self._provenance.update(checkpoint=RANDOM_WEIGHTS, checkpoint_sha256=None)
            else:
                if self.weights_format == "safetensors":
                    check_safetensors_file(path, self.name)
                else:
                    check_checkpoint_file(path, self.name)
                # where it was, for stage 2 to read it again (the sha256 says if it still is)
                self._provenance.update(checkpoint=path.name, checkpoint_sha256=sha256_file(path),
                                        checkpoint_path=str(path.resolve()))
                if self.release.companions:
                    self._provenance.update(companions_sha256={
                        c: sha256_file(path.with_name(c)) for c in self.release.companions})
            self._weights = (path,)
        return self._weights[0]

    def companion(self, filename: str) -> Path:
        """A file the weights come with (the release's companions), read from beside them."""
        return self.weights_path().with_name(filename)

    def _resolve_checkpoint(self) -> Path | None:
        """`self.checkpoint`, else the release file where an earlier download (or the user)
        put it, else a download of it at the pinned revision; never a wait on a network that
        is not there (the endpoint is asked once, briefly, before downloading). The release's
        companions (a config.json) must lie beside the weights file, wherever it is."""
        if self.checkpoint == RANDOM_WEIGHTS:
            return None
        rel = self.release
        if self.checkpoint:
            path = Path(self.checkpoint).expanduser()
            if not path.is_file():
                raise QamroError(f"{self.name}: checkpoint {path} does not exist")
            missing = [c for c in rel.companions if not path.with_name(c).is_file()]
            if missing:
                raise QamroError(f"{self.name}: checkpoint {path} needs {', '.join(missing)} "
                                 f"beside it (the release's: "
                                 f"{', '.join(rel.file_url(c) for c in missing)})")
            return path
        cached = rel.local_path
        if all(f.is_file() for f in (cached, *(cached.with_name(c) for c in rel.companions))):
            return cached
        also = "".join(f" and {rel.file_url(c)}" for c in rel.companions)
        beside = (f" (with {', '.join(rel.companions)} beside it)" if rel.companions else "")
        where = f"the files in {cached.parent}" if rel.companions else f"the file at {cached}"
        fetch = (f"Fetch {rel.url}{also} and pass --checkpoint PATH{beside}, or put {where}; "
                 f"`--backbone melstats` starts without downloads")
        if self.offline:
            raise QamroError(f"{self.name}: no checkpoint and downloads are off (offline). "
                             f"{fetch}")
        if not hub_reachable():
            raise QamroError(f"{self.name}: no checkpoint, and {hub_endpoint()} did not answer "
                             f"within {NETWORK_PROBE_SECONDS:g} s (no network?). {fetch}")
        from huggingface_hub import hf_hub_download

        try:
            for name in (*rel.companions, rel.filename):  # the weights last: present = whole
                got = Path(hf_hub_download(rel.repo, name, revision=rel.revision,
                                           local_dir=cached.parent))
            return got
        except Exception as e:  # huggingface_hub raises a dozen types, by case
            raise QamroError(f"{self.name}: could not download {name} from "
                             f"huggingface.co/{rel.repo} ({str(e).splitlines()[0]}). "
                             f"{fetch}") from e

    def _precision(self):
        """The forward's numeric context: autocast for bf16/fp16; for fp32, fp32 for real
        (TF32 off, see exact_fp32), since the cache records "fp32"."""
        import torch

        if self.precision == "fp32":
            return exact_fp32()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=str(self.device).split(":")[0], dtype=dtype)

    def _start(self, fn, arg) -> "Pending":
        import torch

        self.load()
        with torch.inference_mode(), self._precision():
            return Pending(self.key, self.precision, fn(arg))

    def embed_windows_async(self, windows: list[np.ndarray]) -> "Pending":
        """Start embedding windows (mono float32 at sample_rate, each at most window_samples
        long); `.result()` gives {feature: [W, *shape]} for every audio feature, clip-level
        ones included (extract pools those over a clip's windows with `pool`). The windows
        are copied before this returns: their memory may be reused at once."""
        return self._start(lambda w: self._forward(self._prepare(w)), windows)

    def embed_windows(self, windows: list[np.ndarray]) -> dict[str, np.ndarray]:
        return self.embed_windows_async(windows).result()

    def prepare_windows(self, windows: list[np.ndarray]) -> Any:
        """The model's input for these windows, on the device (benchmarks time the forward
        alone with `forward_prepared`)."""
        import torch

        self.load()
        with torch.inference_mode():
            return self._prepare(windows)

    def forward_prepared(self, inputs: Any) -> "Pending":
        return self._start(self._forward, inputs)

    def embed_texts_async(self, texts: list[str]) -> "Pending":
        return self._start(self._embed_texts, texts if self.uses_text else [])

    def embed_texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.embed_texts_async(texts).result() if self.uses_text else {}

    def pool(self, feats: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """One clip's per-window rows [W, ...] -> one row: mean weighted by window length."""
        w = weights.astype(np.float64) / weights.sum()
        return np.tensordot(w, feats.astype(np.float64), axes=1).astype(np.float32)


# the per-operator float32 settings through which an fp32 forward may round via TF32 on a GPU
FP32_FLAGS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"))


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for matmuls and cuDNN convolutions and RNNs in the block (torch allows TF32 for
    cuDNN by default: an fp32 aesthetics cache moved by up to 1.3e-3 on an H200), the caller's
    settings restored after. The flags are read at launch on the host, so the block need only
    cover the launches. Through the per-operator `fp32_precision` flags where torch has them
    (2.9+): unlike the legacy `allow_tf32` getters, which raise after a mix of the two APIs,
    they can always be read; older torch has the legacy flags only."""
    import torch

    if hasattr(torch.backends.cudnn, "conv"):
        switches = [(getattr(getattr(torch.backends, a), b), "fp32_precision", "ieee")
                    for a, b in FP32_FLAGS]
    else:
        switches = [(torch.backends.cuda.matmul, "allow_tf32", False),
                    (torch.backends.cudnn, "allow_tf32", False)]
    saved = [getattr(obj, attr) for obj, attr, _ in switches]
    try:
        for obj, attr, off in switches:
            setattr(obj, attr, off)
        yield
    finally:
        for (obj, attr, _), value in zip(switches, saved):
            setattr(obj, attr, value)


class Pending:
    """Features a backbone is computing. On a GPU each output is copied into pinned host
    memory asynchronously and an event marks the end of the copies; `result()` waits on it
    (the host is free until then), converts to float32 numpy and refuses non-finite output."""

    def __init__(self, key: str, precision: str, out: dict[str, Any]):
        import torch

        self.key, self.precision = key, precision
        self.out: dict[str, Any] = {}
        self.event = None
        for k, v in out.items():
            if not hasattr(v, "detach"):
                self.out[k] = np.asarray(v, dtype=np.float32)
                continue
            v = v.detach().float()
            if v.is_cuda:
                host = torch.empty(v.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(v, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(torch.cuda.current_stream(v.device))
                v = host
            self.out[k] = v
        self._result: dict[str, np.ndarray] | None = None

    def result(self) -> dict[str, np.ndarray]:
        if self._result is None:
            if self.event is not None:
                self.event.synchronize()
            out = {k: v if isinstance(v, np.ndarray) else v.numpy()
                   for k, v in self.out.items()}
            # fp16 can overflow inside a model (clap-music gave NaN on CUDA); never cache that
            bad = sorted(k for k, v in out.items() if not np.isfinite(v).all())
            if bad:
                hint = "use bf16 or fp32" if self.precision == "fp16" else "is the input finite?"
                raise QamroError(f"{self.key}: non-finite {', '.join(bad)} features at "
                                 f"precision {self.precision}; {hint}")
            self._result = out
        return self._result
