"""`clap-music`: LAION-CLAP (HTSAT-base audio tower, RoBERTa text tower), music checkpoint.

Built without the network: laion_clap's own `create_model` builds the model, except that
its `RobertaModel.from_pretrained("roberta-base")` is answered with a RoBERTa built from
roberta-base's configuration; the checkpoint then supplies every text-tower weight. Only
the tokenizer needs files of its own, and only for text features.

Audio goes through exactly what `CLAP_Module.get_audio_embedding_from_data(x,
use_tensor=False)` does to a numpy clip of at most 10 s: an int16 round trip, repeat-padding
to 10 s, the audio tower, projection and L2 normalisation; here windows go in batches.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
from typing import Any

import numpy as np

from ...errors import QamroError
from .base import Backbone, FeatureSpec, register_backbone, seeded_init

CHECKPOINT_REPO = "lukewys/laion_clap"
CHECKPOINT_NAME = "music_audioset_epoch_15_esc_90.14.pt"
AUDIO_MODEL = "HTSAT-base"  # the audio tower the music checkpoints were trained with
TEXT_MODEL = "roberta"
TOKENIZER_NAME = "roberta-base"
TEXT_MAX_TOKENS = 77  # CLAP_Module.tokenizer's max_length
EMBED_DIM = 512
# roberta-base's architecture; transformers' RobertaConfig() defaults differ from it
# (512 positions, 2 token types, layer_norm_eps 1e-12)
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                    num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                    max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2)
# buffers that old transformers saved in checkpoints and current ones do not expect
STALE_BUFFERS = ("text_branch.embeddings.position_ids", "text_branch.embeddings.token_type_ids")


@register_backbone
class ClapMusic(Backbone):
    name = "clap-music"
    version = 1
    sample_rate = 48000
    window_seconds = 10.0
    uses_text = True

    def feature_specs(self) -> dict[str, FeatureSpec]:
        return {"audio": FeatureSpec((EMBED_DIM,)), "text": FeatureSpec((EMBED_DIM,))}

    def load(self) -> None:
        self._set_offline_env()  # before anything imports huggingface_hub / transformers
        path = self._resolve_checkpoint(CHECKPOINT_REPO, CHECKPOINT_NAME)
        state = read_clap_state(path) if path is not None else None
        self.model, self.model_cfg = build_clap(AUDIO_MODEL)
        if path is not None:
            load_clap_weights(self.model, path, state)
        self.model.to(self.device).eval()
        self.tokenizer, self._tokenizer_problem = self._load_tokenizer()

    def _load_tokenizer(self) -> tuple[Any, str | None]:
        """(tokenizer, None), or (None, why) when none is available: audio-only extraction
        must work offline without tokenizer files, so the error waits for the first text."""
        from transformers import RobertaTokenizer

        source = self.tokenizer_dir or TOKENIZER_NAME
        try:
            tok = RobertaTokenizer.from_pretrained(source, local_files_only=self.offline)
            problem = roberta_vocab_problem(tok.get_vocab())
        except Exception as e:  # transformers raises OSError/ValueError/... by case
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        if problem and self.tokenizer_dir:
            raise QamroError(f"clap-music: no usable {TOKENIZER_NAME} tokenizer in "
                             f"{self.tokenizer_dir} ({problem}); the folder needs its "
                             f"vocab.json and merges.txt (or tokenizer.json)")
        if problem:
            return None, problem
        vocab = json.dumps(sorted(tok.get_vocab().items())).encode()
        self._provenance["tokenizer_vocab_sha256"] = hashlib.sha256(vocab).hexdigest()
        return tok, None

    def _prepare(self, windows: list[np.ndarray]):
        return quantize_int16(stack_windows(windows, self.window_samples, self.device))

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
        if self.tokenizer is None:
            raise QamroError(
                f"clap-music: text features need the {TOKENIZER_NAME} tokenizer, which is "
                f"not available ({self._tokenizer_problem}). Download vocab.json and "
                f"merges.txt from https://huggingface.co/{TOKENIZER_NAME} into a folder and "
                f"pass --tokenizer-dir DIR, or run once online.")
        tokens = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                max_length=TEXT_MAX_TOKENS, return_tensors="pt")
        import torch

        cuda = torch.device(self.device).type == "cuda"
        # on the device before laion_clap sees them: its own .to(device) of host tensors
        # would be a blocking copy
        data = {k: (tokens[k].pin_memory() if cuda else tokens[k]).to(self.device,
                                                                     non_blocking=cuda)
                for k in ("input_ids", "attention_mask")}
        return {"text": self.model.get_text_embedding(data)}  # [N, 512], unit norm


def roberta_vocab_problem(vocab: dict[str, int]) -> str | None:
    """What is wrong with a tokenizer's vocabulary for roberta-base, or None. Needed because
    transformers 5 builds a 5-token tokenizer, silently, when the vocabulary files are
    missing; every word would become <unk>."""
    expected = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3,
                "<mask>": ROBERTA_BASE["vocab_size"] - 1}
    if len(vocab) != ROBERTA_BASE["vocab_size"]:
        return f"{len(vocab)} tokens instead of {ROBERTA_BASE['vocab_size']}"
    wrong = {k: vocab.get(k) for k, v in expected.items() if vocab.get(k) != v}
    return f"special tokens at other ids: {wrong}" if wrong else None


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
    no network access."""
    import laion_clap.hook as hook  # puts laion_clap's `clap_module` package on sys.path
    from transformers import RobertaConfig, RobertaModel

    factory = importlib.import_module(hook.create_model.__module__)
    model_module = importlib.import_module(factory.CLAP.__module__)

    class RobertaFromConfig:
        @staticmethod
        def from_pretrained(name: str, *args, **kwargs):
            if name != TOKENIZER_NAME:
                raise QamroError(f"laion_clap asked for text model {name!r}, expected "
                                 f"{TOKENIZER_NAME!r}: incompatible laion_clap version")
            return RobertaModel(RobertaConfig(**ROBERTA_BASE))

    with _swapped(model_module, "RobertaModel", RobertaFromConfig), seeded_init():
        return factory.create_model(amodel, TEXT_MODEL, precision="fp32", device="cpu",
                                    enable_fusion=False)


def read_clap_state(path) -> dict:
    """A checkpoint's state dict, unpickling tensors and plain containers only: read before
    the model is built, so a bad or unsafe file is refused at once."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise QamroError(f"clap-music: cannot read checkpoint {path} as plain weights; it "
                         f"holds pickled objects that are not tensors or containers, which are "
                         f"refused for safety ({str(e).splitlines()[0]})") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
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
