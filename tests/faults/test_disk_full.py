"""A disk too small for the cache is found when the cache is created, before any work, with
a clear message and nothing left behind; the file's space is reserved, so a disk that fills
later cannot fail a write half way through a run."""
from __future__ import annotations

import os
import resource
import signal

from kit.children import assert_same_file, extract_args, leftovers


def _small_disk(limit: int):
    def apply():  # in the child: files may not grow past `limit` bytes (EFBIG, not a signal)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_too_small_is_reported_at_creation(corpus, reference, tmp_path, tally):
    tally.fault = "disk too small for the cache (file size limit)"
    out = tmp_path / "c.h5"
    c = tally.child(extract_args(corpus, out), preexec_fn=_small_disk(16_000))
    assert c.finish() == 1 and "Traceback" not in c.stderr
    [line] = c.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(out.parent) in line and "disk" in line, line
    assert not out.exists() and leftovers(tmp_path) == []
    c = tally.invoke(extract_args(corpus, out))
    assert c.proc.returncode == 0, c.stderr
    assert_same_file(out, reference)
    st = os.stat(out)
    assert st.st_blocks * 512 >= st.st_size  # every byte backed by disk blocks: not sparse
