"""Everything a training run is, per member, on the host: weights, optimiser buffers, best
weights, early-stopping counters, the epoch reached and the loss history. The engine
(engine.py) works on the device on the members still training and writes back here when it
is rebuilt (members stopped: it drops them), when the run is saved to be resumed, and at the
end. Saved as one safetensors file, replaced atomically, so a killed run resumes from its
last save and finishes with the numbers an uninterrupted run gives."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..checkpoints import save_safetensors
from ..errors import QamroError
from ..store.durable import fault_point, fsync_path

STATE_VERSION = 2  # 2: the history's term weights
# per member and epoch: the objective (mean over heads) and its two parts, train and validation
HISTORY_COLUMNS = ("train_loss", "val_loss", "train_rank", "train_reg", "val_rank", "val_reg",
                   "weight_reg", "weight_rank")  # the terms' weights: 1 but under
# --loss-weighting uncertainty, where they are exp(-s) at the epoch's end, mean over heads


@dataclass
class TrainState:
    """K members' training state; tensors on the CPU, member k in row k."""

    weights: dict[str, torch.Tensor]  # head -> [K, P] current parameters (BatchedMLP.by_member)
    buffers: dict[str, dict[str, torch.Tensor]]  # optimiser buffer name -> head -> [K, P]
    best: dict[str, torch.Tensor]  # head -> [K, P] weights of each member's best epoch
    best_val: torch.Tensor  # [K] float32, inf until the first validation
    best_epoch: torch.Tensor  # [K] int64, 0 = never improved
    stopped: torch.Tensor  # [K] int64, the epoch a member stopped (max_epochs if it did not)
    bad: torch.Tensor  # [K] int64, epochs since the last improvement
    active: torch.Tensor  # [K] bool, still training
    finite: torch.Tensor  # [K] bool, its loss never turned NaN or inf
    epoch: int = 0  # epochs run so far (every active member has run all of them)
    steps: int = 0  # optimiser steps so far (recorded; an engine counts its own as epoch x
    # its steps per epoch, since a run's two pools step differently: engine.py)
    member_epochs: int = 0  # epochs actually computed, summed over members (the run's cost)
    seconds: float = 0.0  # training time spent before this process (resumed runs)
    history: list[np.ndarray] = field(default_factory=list)  # chunks [n, 2 + C]: member, epoch, C

    @property
    def k(self) -> int:
        return len(self.best_val)

    @classmethod
    def fresh(cls, weights: dict[str, torch.Tensor], buffer_names: tuple[str, ...],
              max_epochs: int) -> "TrainState":
        """Initial state from freshly initialised weights: buffers zero, best = initial."""
        k = len(next(iter(weights.values())))
        return cls(weights={h: w.clone() for h, w in weights.items()},
                   buffers={b: {h: torch.zeros_like(w) for h, w in weights.items()}
                            for b in buffer_names},
                   best={h: w.clone() for h, w in weights.items()},
                   best_val=torch.full((k,), float("inf")),
                   best_epoch=torch.zeros(k, dtype=torch.int64),
                   stopped=torch.full((k,), max_epochs, dtype=torch.int64),
                   bad=torch.zeros(k, dtype=torch.int64),
                   active=torch.ones(k, dtype=torch.bool),
                   finite=torch.ones(k, dtype=torch.bool))

    def history_array(self) -> np.ndarray:
        """[n, 2 + C] rows (member, epoch, HISTORY_COLUMNS...) sorted by member then epoch."""
        if not self.history:
            return np.zeros((0, 2 + len(HISTORY_COLUMNS)))
        h = np.concatenate(self.history)
        return h[np.lexsort((h[:, 1], h[:, 0]))]

    # -- saving and resuming ----------------------------------------------------------
    def save(self, path: Path, fingerprint: str) -> None:
        """Write the state to `path` atomically (temporary file, fsync, rename)."""
        tensors = {"best_val": self.best_val, "best_epoch": self.best_epoch,
                   "stopped": self.stopped, "bad": self.bad,
                   "active": self.active.to(torch.uint8), "finite": self.finite.to(torch.uint8),
                   "history": torch.from_numpy(self.history_array())}
        for h in self.weights:
            tensors[f"weights/{h}"] = self.weights[h]
            tensors[f"best/{h}"] = self.best[h]
            for b, per_head in self.buffers.items():
                tensors[f"buffer/{b}/{h}"] = per_head[h]
        meta = {"version": STATE_VERSION, "fingerprint": fingerprint, "epoch": self.epoch,
                "steps": self.steps, "member_epochs": self.member_epochs,
                "seconds": self.seconds, "heads": list(self.weights),
                "buffers": list(self.buffers)}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp,
                             metadata={"qamro_train_state": json.dumps(meta)})
            fsync_path(tmp)
            fault_point("STATE", str(path))
            os.replace(tmp, path)
            fsync_path(path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> tuple["TrainState", dict]:
        """(state, its metadata); a file that is not a whole state is one clear error."""
        try:
            tensors = load_file(str(path))
            meta = _metadata(path)
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as e:
            raise QamroError(f"{path}: not a readable training state ({e}); remove it to start "
                             f"the run again") from None
        if meta.get("version") != STATE_VERSION:
            raise QamroError(f"{path}: training state version {meta.get('version')!r}, this "
                             f"qamro-pipe reads {STATE_VERSION}; remove it to start again")
        history = tensors["history"].numpy()
        state = cls(
            weights={h: tensors[f"weights/{h}"] for h in meta["heads"]},
            buffers={b: {h: tensors[f"buffer/{b}/{h}"] for h in meta["heads"]}
                     for b in meta["buffers"]},
            best={h: tensors[f"best/{h}"] for h in meta["heads"]},
            best_val=tensors["best_val"], best_epoch=tensors["best_epoch"],
            stopped=tensors["stopped"], bad=tensors["bad"],
            active=tensors["active"].bool(), finite=tensors["finite"].bool(),
            epoch=int(meta["epoch"]), steps=int(meta["steps"]),
            member_epochs=int(meta["member_epochs"]), seconds=float(meta["seconds"]),
            history=[history] if len(history) else [])
        return state, meta


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {})["qamro_train_state"])


def read_fingerprint(path: Path) -> tuple[str | None, int | None]:
    """(fingerprint, epoch) of a saved state without reading its tensors; (None, None) when
    the file is unreadable."""
    try:
        meta = _metadata(path)
        return str(meta["fingerprint"]), int(meta["epoch"])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError):
        return None, None
