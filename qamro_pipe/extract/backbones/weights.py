"""Where a backbone's weights come from, and reading them as data only.

Release files are downloaded once, from a Hugging Face repository at a pinned commit, into
weights_dir() (never the package or the cache folder). Nothing here waits on a network that
is not there: the Hugging Face endpoint is asked once per process, with a short timeout,
before any download, and Hugging Face libraries run offline whenever the files are local.

Checkpoints are read with `torch.load(weights_only=True)`, which unpickles tensors and plain
containers only. The LAION-CLAP training checkpoints also hold the optimizer's learning rate
as a numpy float64 (training/scheduler.py's cosine_lr assigns a numpy value), so exactly the
globals that rebuild a numpy float64 scalar are allowed as well; rebuilding one runs no code.
Anything else is refused, and the message names what was refused.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import QamroError

# checkpoint value that builds the real architecture with untrained weights: for tests only
RANDOM_WEIGHTS = "random"
# how long the Hugging Face endpoint may take to answer once before we call it unreachable
NETWORK_PROBE_SECONDS = 3.0
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_MAGIC = b"\x80"  # a pickle (protocol 2+): torch's legacy format, or a raw pickle
LFS_POINTER = b"version https://git-lfs"  # what `git clone` without git-lfs leaves


@dataclass(frozen=True)
class Release:
    """A published weights file: repository, the commit it is fetched at, file name, and the
    files that must lie beside it (a Hugging Face model's config.json)."""
    repo: str
    revision: str  # a commit hash: a moved branch cannot change what is downloaded
    filename: str
    companions: tuple[str, ...] = ()  # fetched with the weights, read from beside them

    def file_url(self, filename: str) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/{self.revision}/{filename}"

    @property
    def url(self) -> str:
        return self.file_url(self.filename)

    @property
    def local_path(self) -> Path:
        """Where a download lands and where a file put by hand is found."""
        return weights_dir() / self.repo.replace("/", "--") / self.filename


def offline_mode(offline: bool | None = None) -> bool:
    """Declared offline (flag) or set in the environment (HF_HUB_OFFLINE / QAMRO_OFFLINE)."""
    if offline is not None:
        return offline
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "QAMRO_OFFLINE", "TRANSFORMERS_OFFLINE"))


def weights_dir() -> Path:
    """Where downloaded checkpoints live: $QAMRO_HOME, else ~/.cache/qamro-pipe; never the
    package directory."""
    return Path(os.environ.get("QAMRO_HOME") or Path.home() / ".cache" / "qamro-pipe").expanduser()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def hub_offline():
    """Hugging Face libraries offline for the block only. huggingface_hub reads HF_HUB_OFFLINE
    once, at import, into `constants.HF_HUB_OFFLINE`, which transformers consults too (through
    `is_offline_mode()`): setting the environment after that import would change nothing."""
    import huggingface_hub.constants as hub

    old = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old


def hub_endpoint() -> str:
    import huggingface_hub.constants as hub

    return hub.ENDPOINT


def hub_reachable() -> bool:
    """Whether the Hugging Face endpoint answers at all (any HTTP status counts)."""
    return _answers(hub_endpoint(), NETWORK_PROBE_SECONDS)


@functools.lru_cache(maxsize=None)
def _answers(url: str, seconds: float) -> bool:
    """Asked once per process. The request runs in a thread that is given `seconds` in all:
    urllib's own timeout does not bound a name lookup, and a host that accepts and never
    answers must cost `seconds`, not huggingface_hub's retries with back-off."""
    import urllib.error
    import urllib.request

    answer: list[bool] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                   timeout=seconds).close()
            answer.append(True)
        except urllib.error.HTTPError:  # an answer, if not a welcome one
            answer.append(True)
        except (OSError, ValueError):  # refused, timed out, no route, no name, bad URL
            answer.append(False)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(seconds)
    return bool(answer and answer[0])


def check_checkpoint_file(path: Path, who: str) -> None:
    """Cheap checks that find the usual wrong files before anything is loaded or written: an
    interrupted download, a Git LFS pointer, a web page or other text, a cut-off archive."""
    size = path.stat().st_size
    if size == 0:
        raise QamroError(f"{who}: checkpoint {path}: empty file (0 bytes): interrupted "
                         f"download? Fetch it again")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(LFS_POINTER):
        raise QamroError(f"{who}: checkpoint {path}: not a PyTorch checkpoint (a Git LFS "
                         f"pointer of {size} bytes, not the file it points to): run `git lfs "
                         f"pull` in that clone or download the file itself")
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise QamroError(f"{who}: checkpoint {path}: truncated or damaged zip archive "
                             f"({size} bytes, no central directory): interrupted download? "
                             f"Fetch it again")
        return
    if not head.startswith(PICKLE_MAGIC):
        kind = "text" if _looks_like_text(head) else "binary data"
        raise QamroError(f"{who}: checkpoint {path}: not a PyTorch checkpoint ({kind} "
                         f"starting {head[:24]!r}, neither a zip archive nor a pickle)")


def check_safetensors_file(path: Path, who: str) -> None:
    """The same cheap checks for a safetensors file: 8 bytes giving the length of a JSON
    header, the header, then the tensors' bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(LFS_POINTER):
        raise QamroError(f"{who}: weights {path}: a Git LFS pointer of {size} bytes, not the "
                         f"file it points to: run `git lfs pull` in that clone or download "
                         f"the file itself")
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
    import numpy as np

    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar
        return [scalar, np.dtype, type(np.dtype(np.float64))]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype,
            type(np.dtype(np.float64))]


def read_checkpoint(path: Path, who: str) -> Any:
    """A checkpoint's contents, unpickling tensors, plain containers and numpy float64
    scalars only; one error line naming the file and the problem otherwise."""
    import warnings

    import torch

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
