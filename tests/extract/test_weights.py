"""Where weights come from without waiting on a missing network, and fp32 meaning fp32."""
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from qamro_pipe.extract.backbones import get_backbone
from qamro_pipe.extract.backbones.releases import _answers, hub_offline

EXE = Path(sys.executable).with_name("qamro-pipe")


class SilentServer:
    """A host that accepts TCP connections and never answers: the network that made
    laion_clap's import retry tokenizer downloads for 712 s. Counts connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:  # closed
                return

    def close(self):
        self.sock.close()
        for c in self.accepted:
            c.close()


@pytest.fixture
def silent_server():
    s = SilentServer()
    yield s
    s.close()


def test_probe_gives_up_on_a_silent_host_within_its_timeout(silent_server):
    from http.server import BaseHTTPRequestHandler, HTTPServer

    t0 = time.monotonic()
    assert _answers(silent_server.url, 0.5) is False
    assert time.monotonic() - t0 < 2.0 and len(silent_server.accepted) == 1
    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert _answers(closed, 0.5) is False

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:  # any HTTP answer, even an error status, means the network is there
        assert _answers(f"http://127.0.0.1:{server.server_port}", 2.0) is True
    finally:
        server.server_close()


def test_hub_offline_is_scoped():
    import huggingface_hub.constants as hub
    from huggingface_hub import is_offline_mode

    before = hub.HF_HUB_OFFLINE
    with hub_offline():
        assert is_offline_mode() is True
    assert hub.HF_HUB_OFFLINE is before


def _offline_unset_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    """A child that believes it is online (no *_OFFLINE variable: tests/conftest.py sets
    HF_HUB_OFFLINE=1 for this process), whose Hugging Face endpoint is `endpoint`, with no
    weights or tokenizer files anywhere and no proxy in the way."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "QAMRO_OFFLINE")
           and not k.lower().endswith("_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"),
               QAMRO_HOME=str(tmp_path / "qamro-home"), NO_PROXY="127.0.0.1,localhost",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _run_until(args, env, server: SilentServer, limit_s: float, most_connections: int):
    """Run a qamro-pipe child; stop it and fail as soon as it connects to the silent
    endpoint more often than `most_connections` (a retry loop), or at `limit_s`.
    -> (returncode, stderr, seconds)."""
    t0 = time.monotonic()
    with open(Path(env["QAMRO_HOME"]).parent / "stderr.txt", "w+") as err:
        proc = subprocess.Popen([str(EXE), *map(str, args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
        while proc.poll() is None:
            late = time.monotonic() - t0 > limit_s
            if late or len(server.accepted) > most_connections:
                proc.kill()
                proc.wait()
                err.seek(0)
                pytest.fail(f"after {time.monotonic() - t0:.0f} s, {len(server.accepted)} "
                            f"connection(s) to the silent endpoint; stderr: {err.read()[-2000:]}")
            time.sleep(0.2)
        err.seek(0)
        return proc.returncode, err.read(), time.monotonic() - t0


def _clips(tmp_path: Path, text: bool) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(0)
    for i in range(2):
        sf.write(tmp_path / f"c{i}.wav", 0.2 * rng.standard_normal(48000).astype(np.float32),
                 48000)
    header, rows = ("id,path,text,score", ["c0,c0.wav,a calm song,3", "c1,c1.wav,,4"]) if text \
        else ("id,path,score", ["c0,c0.wav,3", "c1,c1.wav,4"])
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join([header, *rows]) + "\n")
    return manifest


def test_no_network_no_wait_audio_only_extraction(tmp_path, silent_server):
    """Online in name, a silent network in fact, nothing to fetch (--checkpoint): CLAP
    extraction runs without one connection (laion_clap's import loads its unused tokenizers
    offline) and, with no texts, without any tokenizer."""
    args = ["extract", "--manifest", _clips(tmp_path, text=False), "--backbone", "clap-music",
            "--checkpoint", "random", "--device", "cpu", "--workers", "0", "--quiet",
            "--out", tmp_path / "c.h5"]
    code, err, _ = _run_until(args, _offline_unset_env(tmp_path, silent_server.url),
                              silent_server, limit_s=600, most_connections=0)
    assert code == 0, err
    assert silent_server.accepted == []
    assert (tmp_path / "c.h5").exists()


def test_no_network_texts_without_tokenizer_fail_in_seconds(tmp_path, silent_server):
    """Texts need the tokenizer, which is nowhere local: the endpoint is asked once, the
    run stops with one line saying so, before a model is built or a cache written."""
    from qamro_pipe.extract.backbones.releases import NETWORK_PROBE_SECONDS

    args = ["extract", "--manifest", _clips(tmp_path, text=True), "--backbone", "clap-music",
            "--checkpoint", "random", "--device", "cpu", "--workers", "0", "--quiet",
            "--out", tmp_path / "c.h5"]
    code, err, seconds = _run_until(args, _offline_unset_env(tmp_path, silent_server.url),
                                    silent_server, limit_s=120, most_connections=1)
    errors = [x for x in err.strip().splitlines() if not x.startswith("note: ")]
    assert code == 1 and len(errors) == 1, err  # one error line (notes aside)
    assert "text features need the roberta-base tokenizer" in err
    assert f"{silent_server.url} did not answer" in err
    assert len(silent_server.accepted) == 1  # one probe, no retries
    assert not (tmp_path / "c.h5").exists()
    print(f"failed after {seconds:.1f} s (probe timeout {NETWORK_PROBE_SECONDS} s)")


def test_fp32_forward_runs_without_tf32_and_restores_the_caller_s_flags():
    """The flags exist without a GPU: inside an fp32 forward every TF32 path is off, and
    the caller's settings are back afterwards, after an error too; bf16 leaves them be."""
    import torch

    from qamro_pipe.extract.backbones.base import FP32_FLAGS

    flags = [getattr(getattr(torch.backends, a), b) for a, b in FP32_FLAGS]
    saved = [f.fp32_precision for f in flags]
    seen = []
    try:
        for f in flags:
            f.fp32_precision = "tf32"  # a caller that allows TF32 everywhere
        for precision, fail in (("fp32", False), ("fp32", True), ("bf16", False)):
            b = get_backbone("melstats", precision=precision)
            forward = b._forward

            def recording(x, forward=forward, fail=fail):
                seen.append([f.fp32_precision for f in flags])
                if fail:
                    raise RuntimeError("forward failed")
                return forward(x)

            b._forward = recording
            if fail:
                with pytest.raises(RuntimeError, match="forward failed"):
                    b.embed_windows([np.ones(1600, np.float32)])
            else:
                b.embed_windows([np.ones(1600, np.float32)])
            assert [f.fp32_precision for f in flags] == ["tf32"] * len(flags)
        assert seen == [["ieee"] * len(flags)] * 2 + [["tf32"] * len(flags)]
    finally:
        for f, v in zip(flags, saved):
            f.fp32_precision = v


def test_a_files_digest_is_read_once_and_never_served_after_it_changes(tmp_path):
    """checkpoints.sha256_file remembers a digest per file identity (inode, size, mtime_ns):
    the same bytes rewritten, or other bytes of the same size, are hashed again."""
    import hashlib

    from qamro_pipe.checkpoints import sha256_file

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    assert sha256_file(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    st = os.stat(f)
    f.write_bytes(b"b" * 1000)  # same size; its mtime moves on (set it apart to be sure)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(f) == hashlib.sha256(b"b" * 1000).hexdigest()
