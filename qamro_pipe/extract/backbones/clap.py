"""`clap-music`: LAION-CLAP (HTSAT-base audio tower, RoBERTa text tower), music checkpoint.

Built without the network: laion_clap's own `create_model` builds the model, except that
its `RobertaModel.from_pretrained("roberta-base")` is answered with a RoBERTa built from
roberta-base's configuration; the checkpoint then supplies every text-tower weight. Only
the tokenizer needs files of its own, and only for text features.

A file is loaded as `CLAP_Module.get_audio_embedding_from_filelist` loads it (librosa.load
at 48 kHz: channels averaged, soxr HQ, zero-padded to librosa's length); then audio goes
through exactly what `CLAP_Module.get_audio_embedding_from_data(x,
use_tensor=False)` does to a numpy clip of at most 10 s: an int16 round trip, repeat-padding
to 10 s, the audio tower, projection and L2 normalisation; here windows go in batches.

`audio_input="published"` reproduces the input of the published track 1 code (JethroWangSir/
QAMRO track1/mos_track1.py) and of the challenge baseline (NKU-HLT/MusicEval-baseline
code/mos_track1.py): the file's samples at its own rate (16 kHz for MusicEval), cut to the
first 480,000, given to `get_audio_embedding_from_data(..., use_tensor=True)` (no int16
round trip) as if they were 48 kHz; 30 s of audio read as 10 s, about 3x fast.
"""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any

import numpy as np

from ...checkpoints import read_checkpoint
from ...errors import QamroError
from .base import Backbone, FeatureSpec, register_backbone, seeded_init
from .releases import PublishedWeights, hub_offline
from .roberta_tokenizer import (
    VOCAB_SIZE,
    files_digest,
    find_tokenizer,
    load_tokenizer,
    missing_tokenizer,
    tokenizer_files,
)

# the file laion_clap's README names for music, at the repository's commit b3708341 (the one
# the Hugging Face cache snapshots of this file carry)
RELEASE = PublishedWeights("lukewys/laion_clap",
                           "b3708341862f581175dba5c356a4ebf74a9b6651",
                           "music_audioset_epoch_15_esc_90.14.pt")
AUDIO_MODEL = "HTSAT-base"  # the audio tower the music checkpoints were trained with
TEXT_MODEL = "roberta"
TEXT_MODEL_NAME = "roberta-base"  # what laion_clap asks transformers for
TEXT_MAX_TOKENS = 77  # CLAP_Module.tokenizer's max_length
EMBED_DIM = 512
# roberta-base's architecture (its published config.json; tests hold the two equal);
# transformers' RobertaConfig() defaults differ from it (512 positions, 2 token types,
# layer_norm_eps 1e-12), and a wrong one would still pass a strict state-dict load
ROBERTA_BASE = dict(vocab_size=VOCAB_SIZE, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                    max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2)
# buffers that old transformers saved in checkpoints and current ones do not expect
STALE_BUFFERS = ("text_branch.embeddings.position_ids", "text_branch.embeddings.token_type_ids")


@register_backbone
class ClapMusic(Backbone):
    name = "clap-music"
    version = 2  # 2: librosa's resampled length (1: soxr's, a sample shorter at some rates)
    sample_rate = 48000
    resampler = "librosa"
    window_seconds = 10.0
    uses_text = True
    release = RELEASE
    audio_inputs = ("resampled", "published")
    tokenizer: Any = None  # loaded with the first text (or identity(texts=True))
    _tokenizer_at: tuple[Path | None, str | None] | None = None  # (folder, why not), once

    def feature_specs(self) -> dict[str, FeatureSpec]:
        return {"audio": FeatureSpec((EMBED_DIM,)),
                "text": FeatureSpec((EMBED_DIM,), text=True)}

    def _load(self) -> None:
        path = self.weights_path()
        state = read_clap_state(path) if path is not None else None  # refused before building
        self.model, self.model_cfg = build_clap(AUDIO_MODEL)
        if path is not None:
            load_clap_weights(self.model, path, state)
        self.model.to(self.device).eval()

    def identity(self, texts: bool = False) -> dict[str, str]:
        """The checkpoint's, and with texts the tokenizer files' (loaded and checked now, so
        a missing tokenizer stops the run before anything is written)."""
        out = super().identity(texts)
        if texts:
            self.ensure_tokenizer()
            out["tokenizer"] = f"sha256:{files_digest(self._provenance['tokenizer_files'])}"
        return out

    def ensure_tokenizer(self) -> Any:
        """The roberta-base tokenizer; one clear error when none is available. Audio-only
        extraction never calls this, so it needs no tokenizer files."""
        if self.tokenizer is None:
            if self._tokenizer_at is None:
                self._tokenizer_at = find_tokenizer(self.tokenizer_dir, self.offline)
            folder, why = self._tokenizer_at
            if folder is None:
                raise missing_tokenizer(why)
            self.tokenizer = load_tokenizer(folder)
            self._provenance.update(tokenizer_files=tokenizer_files(folder))
        return self.tokenizer

    def _prepare(self, windows: list[np.ndarray]):
        x = stack_windows(windows, self.window_samples, self.device)
        # use_tensor=True, as the published code calls it, skips laion_clap's int16 round trip
        return x if self.audio_input == "published" else quantize_int16(x)

    def _forward(self, x) -> dict[str, Any]:
        """[W, T] quantised, padded windows on the device -> unit-norm [W, 512], through
        laion_clap's get_audio_embedding. Its `longer` flags (unused without fusion) are one
        tensor already on the device: a flag on the host would be copied with a blocking
        copy, stalling the host until the previous batch's forward is done."""
        import torch

        longer = torch.zeros(1, dtype=torch.bool, device=x.device)
        return {"audio": self.model.get_audio_embedding(
            [{"waveform": row, "longer": longer} for row in x])}

    def _embed_texts(self, texts: list[str]) -> dict[str, Any]:
        tokens = self.ensure_tokenizer()(list(texts), padding="max_length", truncation=True,
                                         max_length=TEXT_MAX_TOKENS, return_tensors="pt")
        import torch

        cuda = torch.device(self.device).type == "cuda"
        # on the device before laion_clap sees them: its own .to(device) of host tensors
        # would be a blocking copy
        data = {k: (tokens[k].pin_memory() if cuda else tokens[k]).to(self.device,
                                                                     non_blocking=cuda)
                for k in ("input_ids", "attention_mask")}
        return {"text": self.model.get_text_embedding(data)}  # [N, 512], unit norm


def quantize_int16(x):
    """laion_clap's int16 round trip (float32_to_int16 then int16_to_float32), which
    get_audio_embedding_from_data applies to numpy input, as torch ops wherever x lives:
    clip, scale, truncate toward 0, divide. float32 division gives the very bits of numpy's
    float64 route for all 65,536 int16 values (tested against laion_clap's own functions)."""
    import torch

    return (x.clamp(-1.0, 1.0) * 32767.0).to(torch.int16).to(x.dtype) / 32767.0


def stack_windows(windows: list[np.ndarray], max_len: int, device):
    """Windows -> one float32 [W, max_len] tensor on `device`, each window repeat-padded the
    way laion_clap's "repeatpad" fills (whole repeats of the clip, then zeros). Rows are
    copied once, into pinned memory when the device is a GPU, which then copies
    asynchronously. Padding before quantising equals laion_clap's quantise-then-pad: the
    round trip is elementwise and maps 0 to 0."""
    import torch

    cuda = torch.device(device).type == "cuda"
    out = torch.empty((len(windows), max_len), dtype=torch.float32, pin_memory=cuda)
    for row, w in zip(out, windows):
        n = len(w)
        if n > max_len:
            raise ValueError(f"window of {n} samples is longer than {max_len}")
        reps = max_len // n
        row[:reps * n].view(reps, n).copy_(torch.from_numpy(np.ascontiguousarray(w)))
        row[reps * n:].zero_()
    return out.to(device, non_blocking=cuda)


def build_clap(amodel: str):
    """(CLAP model, model_cfg) from laion_clap's factory, with untrained, seeded weights and
    no network access. Importing laion_clap loads three tokenizers it never uses here
    (training/data.py, at import), so Hugging Face stays offline meanwhile: online without
    a network, their retries took 712 s."""
    from transformers import RobertaConfig, RobertaModel

    with hub_offline():
        import laion_clap.hook as hook  # puts laion_clap's `clap_module` package on sys.path

    factory = importlib.import_module(hook.create_model.__module__)
    model_module = importlib.import_module(factory.CLAP.__module__)

    class RobertaFromConfig:
        @staticmethod
        def from_pretrained(name: str, *args, **kwargs):
            if name != TEXT_MODEL_NAME:
                raise QamroError(f"laion_clap asked for text model {name!r}, expected "
                                 f"{TEXT_MODEL_NAME!r}: incompatible laion_clap version")
            return RobertaModel(RobertaConfig(**ROBERTA_BASE))

    with _swapped(model_module, "RobertaModel", RobertaFromConfig), seeded_init(), hub_offline():
        return factory.create_model(amodel, TEXT_MODEL, precision="fp32", device="cpu",
                                    enable_fusion=False)


def read_clap_state(path) -> dict:
    """A checkpoint's state dict, read as data only (checkpoints.read_checkpoint): the release
    files are whole training checkpoints, {"epoch", "name", "state_dict", "optimizer"}."""
    import torch

    ckpt = read_checkpoint(Path(path), "clap-music")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise QamroError(f"clap-music: checkpoint {path} holds no state dict")
    return state


def load_clap_weights(model, path, state: dict | None = None) -> None:
    """Checkpoint weights into `model` (keys checked, then a strict load)."""
    state = read_clap_state(path) if state is None else state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    for key in STALE_BUFFERS:
        if key not in expected:
            state.pop(key, None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise QamroError(f"clap-music: checkpoint {path} does not fit {AUDIO_MODEL} + "
                         f"{TEXT_MODEL}: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         f"({len(missing)} / {len(unexpected)} keys)")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # same keys, other shapes
        raise QamroError(f"clap-music: checkpoint {path} does not fit {AUDIO_MODEL}: "
                         f"{e}") from e


@contextlib.contextmanager
def _swapped(obj, attr: str, value):
    """Replace obj.attr for the duration of the block only."""
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)
