"""Where a backbone's weights come from.

PublishedWeights files are downloaded once, from a Hugging Face repository at a pinned commit, into
weights_dir() (never the package or the cache folder). Nothing here waits on a network that
is not there: the Hugging Face endpoint is asked once per process, with a short timeout,
before any download, and Hugging Face libraries run offline whenever the files are local.
Reading a checkpoint as data only is qamro_pipe/checkpoints.py's (stage 2 reads them too).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# checkpoint value that builds the real architecture with untrained weights: for tests only
RANDOM_WEIGHTS = "random"
# how long the Hugging Face endpoint may take to answer once before we call it unreachable
NETWORK_PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class PublishedWeights:
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

