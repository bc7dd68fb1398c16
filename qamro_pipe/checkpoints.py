"""Reading weights files as data only: what both stages need from a checkpoint.

Stage 1 (extract) loads backbones from checkpoints; stage 2 (train) starts heads from the
released Audiobox-Aesthetics heads and scores with them. Neither imports the other, so what
both read lives here.

Checkpoints are read with `torch.load(weights_only=True)`, which unpickles tensors and plain
containers only. The LAION-CLAP training checkpoints also hold the optimizer's learning rate
as a numpy float64 (training/scheduler.py's cosine_lr assigns a numpy value), so exactly the
globals that rebuild a numpy float64 scalar are allowed as well; rebuilding one runs no code.
Anything else is refused, and the message names what was refused.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QamroError
from .untrusted import require_regular_file

MAX_INFLATION = 16  # a checkpoint's zip may declare at most this many times its size
SLACK_BYTES = 1 << 20  # (+ this): torch.save stores members uncompressed

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_MAGIC = b"\x80"  # a pickle (protocol 2+): torch's legacy format, or a raw pickle
LFS_POINTER = b"version https://git-lfs"  # what `git clone` without git-lfs leaves


_DIGESTS: dict[tuple, str] = {}  # (device, inode, size, mtime_ns) -> sha256, this process


def sha256_file(path: str | Path) -> str:
    """The file's sha256, read once per process while its identity (device, inode, size,
    modification time to the nanosecond) stays the same: a release of 400 MB is hashed by
    the backbone, the release heads and the Scorer alike."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if os.stat(path).st_mtime_ns == st.st_mtime_ns:  # not changed while read
            _DIGESTS[key] = h.hexdigest()
        return h.hexdigest()
    return _DIGESTS[key]


def check_checkpoint_file(path: Path, who: str) -> None:
    """Cheap checks that find the usual wrong files before anything is loaded or written: an
    interrupted download, a Git LFS pointer, a web page or other text, a cut-off archive."""
    size, head = _start(path, f"{who}: checkpoint {path}: not a PyTorch checkpoint (a")
    if size == 0:
        raise QamroError(f"{who}: checkpoint {path}: empty file (0 bytes): interrupted "
                         f"download? Fetch it again")
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise QamroError(f"{who}: checkpoint {path}: truncated or damaged zip archive "
                             f"({size} bytes, no central directory): interrupted download? "
                             f"Fetch it again")
        _check_inflation(path, size, who)
        return
    if not head.startswith(PICKLE_MAGIC):
        kind = "text" if _looks_like_text(head) else "binary data"
        raise QamroError(f"{who}: checkpoint {path}: not a PyTorch checkpoint ({kind} "
                         f"starting {head[:24]!r}, neither a zip archive nor a pickle)")


def _check_inflation(path: Path, size: int, who: str) -> None:
    """Refuse, before torch inflates anything, a zip whose members declare more than
    MAX_INFLATION times the archive's size: torch.save stores its members uncompressed, so a
    real checkpoint declares about its own size, and torch allocates what a member declares."""
    try:
        with zipfile.ZipFile(path) as z:
            declared = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise QamroError(f"{who}: checkpoint {path}: damaged zip archive ({e})") from None
    if declared > MAX_INFLATION * size + SLACK_BYTES:
        raise QamroError(f"{who}: checkpoint {path}: its zip members declare "
                         f"{declared / 1e6:,.1f} MB in a file of {size / 1e6:,.1f} MB; a "
                         f"checkpoint may declare at most {MAX_INFLATION} times its size "
                         f"(+{SLACK_BYTES >> 20} MB: torch.save does not compress), so it is "
                         f"not inflated")


def _start(path: Path, refusal: str) -> tuple[int, bytes]:
    """A weights file's size and first 64 bytes; a Git LFS pointer (what `git clone` without
    git-lfs leaves) refused as `refusal` + what it is."""
    require_regular_file(path, "weights file")  # a FIFO would block the open forever
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(LFS_POINTER):
        raise QamroError(f"{refusal} Git LFS pointer of {size} bytes, not the file it points "
                         f"to): run `git lfs pull` in that clone or download the file itself")
    return size, head


def check_safetensors_file(path: Path, who: str) -> None:
    """The same cheap checks for a safetensors file: 8 bytes giving the length of a JSON
    header, the header, then the tensors' bytes."""
    size, head = _start(path, f"{who}: weights {path}: not a safetensors file (a")
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if size < 10 or not head[8:9] == b"{" or not 0 < n <= size - 8:
        kind = ("an empty file" if size == 0 else "text" if _looks_like_text(head)
                else "binary data")
        raise QamroError(f"{who}: weights {path}: not a safetensors file ({kind}, {size} "
                         f"bytes){'; interrupted download? Fetch it again' if size else ''}")


def read_safetensors(path: Path, who: str) -> dict[str, Any]:
    """A safetensors file's tensors (the format holds nothing but tensors: nothing is
    unpickled); one error line naming the file otherwise."""
    from safetensors.torch import load_file

    check_safetensors_file(path, who)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type for any damage
        raise QamroError(f"{who}: weights {path}: not a readable safetensors file "
                         f"({_first_line(e)}); truncated or damaged? Fetch it again") from None


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, whose failure to write (a full disk, a read-only folder) is
    raised as the OSError it is: safetensors reports it as its own error type."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        code = re.search(r"(?:os error|code:) (\d+)", str(e))
        if code:
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
        raise QamroError(f"{path}: could not be written ({_first_line(e)})") from None


def _looks_like_text(head: bytes) -> bool:
    try:
        return head.decode("utf-8").isprintable() or b"\n" in head
    except UnicodeDecodeError:
        return False


def numpy_scalar_globals() -> list[Any]:
    """What unpickling a numpy float64 scalar needs: `scalar`, `numpy.dtype`, and the dtype's
    class, which the unpickler must be allowed to `__setstate__` (numpy.dtypes.Float64DType).
    Under numpy 2 `scalar` lives in numpy._core and is also allowed under the name numpy 1
    pickled it by (numpy.core.multiarray.scalar), which the released checkpoints carry."""
    try:  # where `scalar` lives depends on the numpy installed
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar
        return [scalar, np.dtype, type(np.dtype(np.float64))]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype,
            type(np.dtype(np.float64))]


def read_checkpoint(path: Path, who: str) -> Any:
    """A checkpoint's contents, unpickling tensors, plain containers and numpy float64
    scalars only; one error line naming the file and the problem otherwise."""
    import torch  # heavy: only when a checkpoint is read

    check_checkpoint_file(path, who)
    if not hasattr(torch.serialization, "safe_globals"):
        raise QamroError(f"{who}: reading checkpoint {path} safely needs torch >= 2.5 "
                         f"(installed: {torch.__version__})")
    try:
        with torch.serialization.safe_globals(numpy_scalar_globals()), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")  # a raw pickle's
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... by case
        raise _load_problem(path, who, e) from None


def _load_problem(path: Path, who: str, e: Exception) -> QamroError:
    """torch.load's failure as one line: a refusal names what was refused."""
    text = str(e)
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        refused = refused_globals(path, text)
        if refused is not None:
            return QamroError(f"{who}: cannot read checkpoint {path} as plain weights: it "
                              f"holds pickled {refused} (refused for safety: only tensors, "
                              f"containers and numpy float64 scalars are unpickled; nothing "
                              f"in the file was run)")
        return QamroError(f"{who}: checkpoint {path}: not a PyTorch checkpoint (a pickle that "
                          f"torch.save did not write: {_first_line(e)})")
    if "magic number" in text:  # a pickle, but not torch's legacy format
        return QamroError(f"{who}: checkpoint {path}: not a PyTorch checkpoint (a pickle that "
                          f"torch.save did not write)")
    return QamroError(f"{who}: checkpoint {path}: not a readable PyTorch checkpoint "
                      f"({_first_line(e)}); truncated or damaged? Fetch it again")


def refused_globals(path: Path, message: str) -> str | None:
    """What torch's weights-only unpickler refused: every global in a zip checkpoint that is
    neither allowed by torch nor by us (a scan of the pickle's opcodes, which runs nothing),
    else the one its message names."""
    import torch

    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
               for g in numpy_scalar_globals()}
    try:
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                  if g not in allowed]
    except Exception:  # a legacy-format or unreadable file: only the message is left
        unsafe = []
    if unsafe:
        return ", ".join(sorted(set(unsafe)))
    m = (re.search(r"Unsupported global: GLOBAL (\S+)", message)
         or re.search(r"but got <class '([^']+)'>", message)
         or re.search(r"Unsupported class (\S+)", message))
    return m.group(1).rstrip(".,") if m else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return (text.splitlines() or [type(e).__name__])[0]


# -- the Audiobox-Aesthetics release checkpoint (audiobox_aesthetics.infer reads it so) -----
# AesMultiOutput arguments that the release checkpoint's model_cfg carries
AES_HEAD_CFG_KEYS = ("proj_num_layer", "proj_ln", "proj_act_fn", "proj_dropout", "nth_layer",
                     "use_weighted_layer_sum", "precision", "normalize_embed", "output_dim")


def read_aes_checkpoint(path: str | Path) -> tuple[dict, Any, dict]:
    """(model_cfg, target_transform, state_dict) of a release-format checkpoint.pt, read as
    data only (read_checkpoint)."""
    ckpt = read_checkpoint(Path(path), "aesthetics")
    if not isinstance(ckpt, dict) or not {"model_cfg", "state_dict"} <= set(ckpt):
        raise QamroError(f"aesthetics: {path} is not an Audiobox-Aesthetics checkpoint "
                         f"(expected keys model_cfg and state_dict)")
    missing = [k for k in AES_HEAD_CFG_KEYS if k not in ckpt["model_cfg"]]
    if missing:
        raise QamroError(f"aesthetics: {path}: model_cfg lacks {missing}")
    # as infer.py: Lightning's "model." prefix off (its unescaped "." matches any character)
    state = {re.sub("^model.", "", k): v for k, v in ckpt["state_dict"].items()}
    return dict(ckpt["model_cfg"]), ckpt.get("target_transform"), state
