"""A qamro-pipe model as a CMI-RewardBench benchmark model.

Haiwen-Xia/CMI-RewardBench's `inference_benchmark.py --model_class_path MODULE:CLASS` builds
`CLASS(checkpoint=-c, device=--device, **--model_init_kwargs_json)`, accepts a class with an
`sr` property and `score_batch(inputs, batch_size, max_dur, **kwargs)`, and calls it with
BenchmarkBatchInput items (audio: a path, or a waveform tensor at `sr` where the file is
missing; text; lyrics; ref_audio). It reads an [N, 2] array: column 0 alignment, column 1
musicality, and prefers B where B's musicality is not lower. Use:

    python inference_benchmark.py -c MODEL_FOLDER --device cpu \\
        --model_class_path qamro_pipe.cmi_rewardbench:QamroRewardModel
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import QamroError
from .extract import audio as audio_io
from .extract.memory import Item
from .scorer import Scorer


class QamroRewardModel:
    """`checkpoint`: a run folder, exported model folder or owner/name. `musicality` and
    `alignment` name the heads for the two columns: by default the first head, and a head
    reading text features (else the musicality head) for alignment."""

    def __init__(self, checkpoint: str, device: str = "auto", members: str | None = None,
                 musicality: str | None = None, alignment: str | None = None, **_: Any):
        self.scorer = Scorer.load(checkpoint, device=_device(device), members=members)
        heads = self.scorer.trained.heads
        names = [h.name for h in heads]
        texty = [h.name for h in heads if any(f.split(":")[-1] == "text" for f in h.features)]
        self.musicality = musicality or names[0]
        self.alignment = alignment or (texty[0] if texty else self.musicality)
        for which, h in (("musicality", self.musicality), ("alignment", self.alignment)):
            if h not in names:
                raise QamroError(f"{which}={h!r}: this model's heads are {', '.join(names)}")

    @property
    def sr(self) -> int:
        return self.scorer.sample_rate

    def score_batch(self, inputs: Sequence[Any], batch_size: int, max_dur: float,
                    **kwargs: Any) -> np.ndarray:
        """[N, 2]: (alignment, musicality) per input; the first `max_dur` seconds of each."""
        items = [self._item(i, x, max_dur) for i, x in enumerate(inputs)]
        rows, failures = self.scorer.score_items(items, batch_size=None)
        by_id = {r["id"]: r for r in rows}
        out = np.full((len(items), 2), np.nan)
        for i, it in enumerate(items):
            if it.id not in by_id:  # the harness records the error and stops (or goes on)
                raise QamroError(failures.get(it.id, f"input {i}: not scored"))
            out[i] = by_id[it.id][self.alignment], by_id[it.id][self.musicality]
        return out

    def _item(self, i: int, x: Any, max_dur: float) -> Item:
        fields = x.to_dict() if hasattr(x, "to_dict") else dict(x)
        clip, text = fields.get("audio"), fields.get("text") or ""
        if isinstance(clip, (str, bytes)) or hasattr(clip, "__fspath__"):
            end = None
            if max_dur and audio_io.probe(clip).duration > max_dur:
                end = float(max_dur)
            return Item(id=str(i), path=Path(clip), end=end, text=text)
        if hasattr(clip, "detach"):
            clip = clip.detach().cpu().float().numpy()
        clip = np.asarray(clip)
        if max_dur:
            clip = clip[..., :int(max_dur * self.sr)]
        return Item(id=str(i), samples=clip, sr=self.sr, text=text)


def _device(device: str) -> str:
    """The harness's default is cuda:0; where there is no GPU that would fail to load."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            warnings.warn(f"device {device}: no GPU here; scoring on the CPU")
            return "cpu"
    return device
