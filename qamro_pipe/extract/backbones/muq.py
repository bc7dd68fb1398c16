"""`muq`: MuQ (OpenMuQ/MuQ-large-msd-iter), the music encoder of the AudioMOS 2025 track 1
winner, per-layer time means per 30 s window.

The `muq` package's own model runs: `MuQ(config)` builds it (its `from_pretrained` does the
same from the release's config.json, then loads model.safetensors), and
`MuQ.forward(x, output_hidden_states=True)` gives 13 hidden states [W, T, 1024] (the conv
front end's output and 12 conformer layers, the last layer-normalised), from which the time
mean of each is stored, [13, 1024] per window, as the Audiobox-Aesthetics backbone stores
WavLM's: a head learns its own softmax weights over the layers (HeadSpec.layer_weights).

Windows are 30 s, the crop MuQ was pre-trained on (750 tokens at 25 Hz), and each runs at its
own length, unpadded, as the package's README runs a clip: windows of equal length share a
forward pass. A window shorter than 1,025 samples (43 ms: the mel STFT reflect-pads by
n_fft/2 = 1,024) is zero-padded to that length; MuQ cannot embed less.

Two settings make muq 0.1.0 (written against transformers 4) run on transformers 5, where
the conformer reads `config._attn_implementation` and returns no hidden states: the config
names the eager attention transformers 4 computed, and during the build the encoder class
muq imports is a subclass that records what transformers 4 returned (each layer's input and
the final, normalised output). With transformers 4 neither is needed and the subclass is not
used. (The two give the same bits on random weights: checked once against transformers
4.46.3, see tests/extract/test_muq.py.)

Text: MuQ-MuLan (a separate 700M model with its own MuQ and an XLM-RoBERTa text tower that
it downloads when built) is not part of this backbone; text features come from another cache
of the dataset (docs/recipes.md, `CACHE:FEATURE`).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from ...checkpoints import read_safetensors
from ...errors import QamroError
from .base import Backbone, FeatureSpec, register_backbone, seeded_init
from .releases import PublishedWeights

# the model the package's README names; the commit is the one a public pin of this repository
# uses (unverified against the Hugging Face page itself, which could not be reached)
RELEASE = PublishedWeights("OpenMuQ/MuQ-large-msd-iter",
                           "0562a57814f6f8bbd9fdea0a25921a2fce1a841a",
                           "model.safetensors", companions=("config.json",))
N_LAYERS = 13  # encoder_depth 12 conformer layers + the conv front end's output
WIDTH = 1024  # encoder_dim
MIN_WINDOW_SAMPLES = 1025  # the mel STFT's reflect padding needs more than n_fft/2 = 1024
ATTENTION = "eager"  # what transformers 4's conformer computed (no other kernel existed)
# The architecture for random weights: muq's MuQConfig defaults plus the mel statistics and
# conformer settings of MuQ's own pre-training recipe (tencent-ailab/MuQ,
# src/recipes/pretrain: its Stat and W2v2Config dataclasses, the values the released model
# was trained with). A release's config.json replaces all of it.
W2V2_CONFIG = dict(
    activation_dropout=0.1, adapter_kernel_size=3, adapter_stride=2, add_adapter=False,
    apply_spec_augment=True, architectures=["Wav2Vec2ConformerForCTC"], attention_dropout=0.1,
    bos_token_id=1, classifier_proj_size=256, codevector_dim=768, conformer_conv_dropout=0.1,
    contrastive_logits_temperature=0.1, conv_bias=True, conv_depthwise_kernel_size=31,
    conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
    ctc_loss_reduction="sum", ctc_zero_infinity=False, diversity_loss_weight=0.1,
    do_stable_layer_norm=True, eos_token_id=2, feat_extract_activation="gelu",
    feat_extract_dropout=0.0, feat_extract_norm="layer", feat_proj_dropout=0.1,
    feat_quantizer_dropout=0.0, final_dropout=0.1, gradient_checkpointing=False,
    hidden_act="swish", hidden_dropout=0.1, hidden_dropout_prob=0.1, hidden_size=1024,
    initializer_range=0.02, intermediate_size=4096, layer_norm_eps=1e-5, layerdrop=0.0,
    mask_feature_length=10, mask_feature_min_masks=0, mask_feature_prob=0.0,
    mask_time_length=10, mask_time_min_masks=2, mask_time_prob=0.05,
    max_source_positions=5000, model_type="wav2vec2-conformer", num_adapter_layers=3,
    num_attention_heads=16, num_codevector_groups=2, num_codevectors_per_group=320,
    num_conv_pos_embedding_groups=16, num_conv_pos_embeddings=128, num_feat_extract_layers=7,
    num_hidden_layers=24, num_negatives=100, output_hidden_size=1024, pad_token_id=0,
    position_embeddings_type="rotary", proj_codevector_dim=768, rotary_embedding_base=10000,
    tdnn_dilation=[1, 2, 3, 1, 1], tdnn_dim=[512, 512, 512, 512, 1500],
    tdnn_kernel=[5, 3, 3, 1, 1], torch_dtype="float32", transformers_version="4.19.0.dev0",
    use_weighted_layer_sum=False, vocab_size=32, xvector_output_dim=512)
RANDOM_CONFIG = {"stat": {"melspec_2048_cnt": 14282760192,
                          "melspec_2048_mean": 6.768444971712967,
                          "melspec_2048_std": 18.417922652295623},
                 "w2v2_config": W2V2_CONFIG}
# modules whose weights the forward reads: a checkpoint lacking any is refused (the
# package's from_pretrained loads with strict=False and would run them untrained)
USED_MODULES = ("model.conv.", "model.conformer.")


@register_backbone
class MuQ(Backbone):
    name = "muq"
    version = 2  # 2: librosa's resampled length (1: soxr's, a sample shorter at some rates)
    sample_rate = 24000
    resampler = "librosa"  # the package's README loads a file with librosa.load(sr=24000)
    window_seconds = 30.0
    release = RELEASE
    weights_format = "safetensors"

    def feature_specs(self) -> dict[str, FeatureSpec]:
        return {"layers": FeatureSpec((N_LAYERS, WIDTH), per_window=True)}

    def _load(self) -> None:
        path = self.weights_path()
        if path is None:
            config, state = RANDOM_CONFIG, None
        else:  # both read, and refused, before anything is built
            config = read_muq_config(self.companion("config.json"))
            state = read_safetensors(path, self.name)
        self.model = build_muq(config)
        if state is not None:
            load_muq_weights(self.model, state, path)
        self.model.to(self.device).eval()

    def _prepare(self, windows: list[np.ndarray]):
        return group_by_length(windows, self.window_samples, self.device)

    def _forward(self, groups) -> dict[str, Any]:
        """Each group of equal-length windows through MuQ.forward -> [W, 13, 1024], rows in
        the windows' order."""
        import torch

        n = sum(len(rows) for rows, _ in groups)
        out = None
        for rows, x in groups:
            means = layer_means(self.model, x)  # [w, 13, 1024]
            if out is None:
                out = means.new_empty((n, *means.shape[1:]))
            out[rows] = means
        return {"layers": out if out is not None else torch.empty(0, N_LAYERS, WIDTH)}


def group_by_length(windows: list[np.ndarray], window_samples: int, device="cpu"):
    """Windows -> [(row indices, [w, T] float32 on the device)], one entry per length T:
    MuQ has no padding mask worth trusting (its conv front end and conformer convolutions see
    across a pad), so windows run at their own length. Rows are copied once, into pinned
    memory for a GPU."""
    import torch

    cuda = torch.device(device).type == "cuda"
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        if len(w) > window_samples:
            raise ValueError(f"window of {len(w)} samples is longer than {window_samples}")
        by_len.setdefault(max(len(w), MIN_WINDOW_SAMPLES), []).append(i)
    groups = []
    for length, rows in by_len.items():
        x = torch.zeros(len(rows), length, pin_memory=cuda)
        for j, i in enumerate(rows):
            x[j, :len(windows[i])] = torch.from_numpy(np.asarray(windows[i], dtype=np.float32))
        groups.append((torch.tensor(rows, device=device), x.to(device, non_blocking=cuda)))
    return groups


def layer_means(model, x):
    """The package's forward with all hidden states; the time mean of each. -> [w, L, D]"""
    import torch

    hidden = model(x, output_hidden_states=True).hidden_states  # L x [w, T', D]
    return torch.stack([h.mean(dim=1) for h in hidden], dim=1)


def read_muq_config(path: Path) -> dict[str, Any]:
    """A release config.json as MuQConfig's fields (the hub mixin ignores other keys too)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise QamroError(f"muq: {path}: not a readable JSON config ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # the hub mixin may nest the init argument
    if not isinstance(data, dict) or not {"stat", "w2v2_config"} <= set(data):
        raise QamroError(f"muq: {path}: not a MuQ config.json (expected keys stat and "
                         f"w2v2_config)")
    depth, width = data.get("encoder_depth", 12), data.get("encoder_dim", WIDTH)
    if (depth + 1, width) != (N_LAYERS, WIDTH):
        raise QamroError(f"muq: {path}: a MuQ with {depth} layers of width {width}; this muq "
                         f"stores {N_LAYERS - 1} layers of {WIDTH}")
    return data


def build_muq(config: dict[str, Any]):
    """The package's MuQ from a config, with seeded, untrained weights (MuQModel seeds torch
    and Python's `random` itself; both are restored afterwards)."""
    from muq import MuQ as PackageMuQ
    from muq import MuQConfig

    fields = MuQConfig.__dataclass_fields__
    cfg = {k: v for k, v in config.items() if k in fields}
    cfg["w2v2_config"] = {**cfg["w2v2_config"], "_attn_implementation": ATTENTION}
    saved = random.getstate()
    try:
        with seeded_init(), _recording_encoder():
            return PackageMuQ(MuQConfig(**cfg))
    finally:
        random.setstate(saved)


@contextlib.contextmanager
def _recording_encoder():
    """While muq builds its model: on transformers 5, whose conformer encoder returns no
    hidden states, the encoder class muq imports is one that also returns them as
    transformers 4 did; on transformers 4, the class itself."""
    import transformers.models.wav2vec2_conformer.modeling_wav2vec2_conformer as conformer

    base = conformer.Wav2Vec2ConformerEncoder
    if "output_hidden_states" in inspect.signature(base.forward).parameters:
        yield
        return

    class RecordingEncoder(base):
        def forward(self, hidden_states, attention_mask=None, output_hidden_states=False,
                    **kwargs):
            states = []

            def keep(module, args, kw):
                states.append(args[0] if args else kw["hidden_states"])
            hooks = [layer.register_forward_pre_hook(keep, with_kwargs=True)
                     for layer in self.layers]
            try:
                out = super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            if output_hidden_states:
                out["hidden_states"] = (*states, out["last_hidden_state"])
            return out

    conformer.Wav2Vec2ConformerEncoder = RecordingEncoder
    try:
        yield
    finally:
        conformer.Wav2Vec2ConformerEncoder = base


def load_muq_weights(model, state: dict, path) -> None:
    """A release state dict into the package's model: as its from_pretrained (strict=False),
    but refused when any weight the forward reads is missing or has another shape."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k.startswith(USED_MODULES) and k not in state)
    if missing:
        raise QamroError(f"muq: weights {path} do not fit MuQ: missing {missing[:5]} "
                         f"({len(missing)} weights the encoder reads)")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise QamroError(f"muq: weights {path} do not fit MuQ: "
                         f"{str(e).splitlines()[0]}") from None
