"""`aesthetics`: the WavLM encoder of Meta's Audiobox-Aesthetics, per-layer pooled.

The original model gives each axis (CE, CU, PC, PQ) its own softmax weights over the
encoder's 13 hidden states, then a masked time mean, L2 normalisation and an MLP. The
weighted sum and the masked mean are both linear, so storing the masked time mean of every
hidden state per 10 s window, [13, 768], lets a head reproduce the original exactly
(up to float rounding) and learn its own layer weights.

Audio reaches the model as `AesPredictor.forward` gives it a file: channels averaged, then
resampled to 16 kHz by torchaudio.functional.resample with its defaults (soxr, which the
other backbones use, moved zero-shot scores by ~1e-2 on 44.1 and 48 kHz audio).
Windows are padded to 10 s and masked exactly as audiobox_aesthetics.infer's
`make_inference_batch` does; the sample mask becomes a frame mask inside WavLM
(`forward_padding_mask`: a frame is padding when all of its samples are).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ...checkpoints import AES_HEAD_CFG_KEYS as HEAD_CFG_KEYS
from ...checkpoints import read_aes_checkpoint
from ...errors import QamroError
from .base import Backbone, FeatureSpec, register_backbone, seeded_init
from .releases import PublishedWeights

# the file audiobox_aesthetics.utils.load_model downloads (DEFAULT_HF_REPO, DEFAULT_CKPT_FNAME),
# at the repository's commit 9b1dd8e5 (the head of main in the snapshots users pinned in 2025-26)
RELEASE = PublishedWeights("facebook/audiobox-aesthetics",
                           "9b1dd8e5df9af7216e836a98974fe3b82c56ded6", "checkpoint.pt")
N_LAYERS = 13  # WavLM-base: the pre-transformer features and 12 transformer layers
WIDTH = 768
# the release heads' model_cfg (HEAD_CFG_KEYS), used for random weights
RELEASE_HEAD_CFG = dict(proj_num_layer=5, proj_ln=True, proj_act_fn="gelu", proj_dropout=0.0,
                        nth_layer=N_LAYERS, use_weighted_layer_sum=True, precision="32",
                        normalize_embed=True, output_dim=1)


@register_backbone
class Aesthetics(Backbone):
    name = "aesthetics"
    version = 2  # 2: resampled with torchaudio, as AesPredictor does (1: soxr)
    sample_rate = 16000
    resampler = "torchaudio"
    window_seconds = 10.0
    release = RELEASE

    def feature_specs(self) -> dict[str, FeatureSpec]:
        return {"layers": FeatureSpec((N_LAYERS, WIDTH), per_window=True)}

    def _load(self) -> None:
        path = self.weights_path()
        if path is None:
            self.model = build_aes(RELEASE_HEAD_CFG, target_transform=None)
        else:
            cfg, target_transform, state = read_aes_checkpoint(path)
            self.model = build_aes(cfg, target_transform)
            try:
                self.model.load_state_dict(state)
            except RuntimeError as e:
                raise QamroError(f"aesthetics: checkpoint {path} does not fit "
                                 f"AesMultiOutput: {e}") from e
        self.model.to(self.device).eval()

    def _prepare(self, windows: list[np.ndarray]):
        return pad_and_mask(windows, self.window_samples, self.device)

    def _forward(self, inputs) -> dict[str, Any]:
        wav, mask = inputs
        return {"layers": layer_means(self.model, wav, mask)}  # [W, 13, 768]


def pad_and_mask(windows: list[np.ndarray], window_samples: int, device="cpu"):
    """make_inference_batch's collation: zero-pad each window to window_samples;
    mask is True on real samples. -> wav [W, 1, T] float32, mask [W, 1, T] bool. Rows are
    copied once, into pinned memory for a GPU (then uploaded asynchronously); the mask is
    built where it is used, from the lengths."""
    import torch

    cuda = torch.device(device).type == "cuda"
    wav = torch.empty(len(windows), 1, window_samples, pin_memory=cuda)
    lengths = torch.tensor([len(w) for w in windows])
    for row, w in zip(wav[:, 0], windows):  # each sample written once: the window, then zeros
        if len(w) > window_samples:
            raise ValueError(f"window of {len(w)} samples is longer than {window_samples}")
        row[:len(w)].copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
        row[len(w):].zero_()
    lengths = lengths.to(device, non_blocking=cuda)
    mask = torch.arange(window_samples, device=device) < lengths[:, None, None]
    return wav.to(device, non_blocking=cuda), mask


def layer_means(model, wav, mask):
    """The first half of AesMultiOutput.forward, before any per-axis weighting:
    masked time mean of each hidden state. -> [W, L, C]"""
    import torch

    x = wav.squeeze(1)  # [W, T]
    if model.wavlm_model.cfg.normalize:
        x = torch.nn.functional.layer_norm(x, x.shape)
    (_, layer_results), frame_padding = model.wavlm_model.extract_features(
        source=x, padding_mask=~mask.squeeze(1), output_layer=model.nth_layer,
        ret_layer_results=True)
    hidden = torch.stack([h for h, _ in layer_results], dim=-1)  # [T', W, C, L]
    keep = (~frame_padding).type_as(hidden).T[:, :, None, None]  # [T', W, 1, 1]
    # clamp as the original: a window with no whole real frame gives zeros, not NaN
    return (hidden * keep).sum(dim=0).transpose(1, 2) / keep.sum(dim=0).clamp(min=1)


def build_aes(head_cfg: dict, target_transform):
    """AesMultiOutput with the release WavLM architecture; seeded, untrained weights."""
    from audiobox_aesthetics.model.aes import AesMultiOutput

    with seeded_init():
        return AesMultiOutput(**{k: head_cfg[k] for k in HEAD_CFG_KEYS},
                              target_transform=target_transform)
