"""Issue 20: outputs that cannot be written (a full disk, a file size limit, a read-only
rename), `cache merge` onto a full disk and after a kill, crafted shards, and settings torch
cannot hold: one line each, nothing lost, and the rerun finishes the work."""
from __future__ import annotations

import errno
import json
import os
import resource
import signal
from contextlib import contextmanager

import numpy as np
import pytest

from qamro_pipe.errors import CacheError
from qamro_pipe.store import CacheWriter, create_cache

from kit.caches import make_synthetic_cache
from kit.children import assert_same_file, child_env, extract_args, leftovers
from kit.hostile import cli, crafted, one_line_error, tree_digest

SMALL = dict(n_systems=4, per_system=6, dim=8)


@contextmanager
def file_size_limit(limit: int):
    """Files this process writes may not grow past `limit` bytes (EFBIG, as a full disk
    gives ENOSPC: the write fails where it stands), for the block only."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


def read_only(monkeypatch, folder):
    """The kernel's answer on a read-only mount of `folder`, at the Python calls that create
    or replace files there: opening for writing, making a folder, renaming into it (EROFS).
    (A real read-only mount needs privileges the tests do not have.)"""
    real_open, real_mkdir, real_replace = os.open, os.mkdir, os.replace
    inside = lambda p: str(os.path.abspath(p)).startswith(str(folder))  # noqa: E731

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))

    def open_(p, flags, *a, **k):
        if inside(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(p)
        return real_open(p, flags, *a, **k)

    def mkdir_(p, *a, **k):
        return refuse(p) if inside(p) else real_mkdir(p, *a, **k)

    def replace_(src, dst, *a, **k):
        return refuse(dst) if inside(dst) else real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir_)
    monkeypatch.setattr(os, "replace", replace_)


def _small_disk(limit: int):
    def apply():  # in a child: files may not grow past `limit` bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("args, expect", [
    (["--lr", "1e300"], "--lr 1e+300: must be at most 3.4e+38"),
    (["--weight-decay", "nan"], "--weight-decay nan: must be a finite number"),
    (["--weight-decay", "1e300"], "--weight-decay 1e+300: must be at most"),
])
def test_settings_torch_cannot_hold_are_one_line(args, expect, tmp_path, tally):
    tally.fault = f"train {' '.join(args)}"
    tally.in_process = tally.runs = 1
    cache = make_synthetic_cache(tmp_path / "c.h5", **SMALL)
    line = one_line_error(cli("train", "--cache", cache, "--out", tmp_path / "r", *args), expect)
    assert "checkpoint_seconds" not in line
    assert not (tmp_path / "r").exists()


def test_training_onto_a_full_disk_is_one_line_and_loses_nothing(tmp_path, tally):
    """safetensors reports a write it cannot finish as its own SafetensorError (a traceback
    before); the run folder is assembled aside, so nothing half-written appears."""
    tally.fault = "disk full while training writes its state and run folder (file size limit)"
    tally.in_process = tally.runs = 1
    cache = make_synthetic_cache(tmp_path / "c.h5", **SMALL)
    with file_size_limit(20_000):
        r = cli("train", "--cache", cache, "--out", tmp_path / "r", "--max-epochs", "2",
                "--quiet")
    one_line_error(r, "File too large", "rerun the same command")
    assert not (tmp_path / "r").exists()


def test_the_skip_journal_on_a_full_disk_is_one_line(tmp_path, tally):
    """Appending a skipped clip to CACHE.journal when no byte more can be written raised
    OSError out of CacheWriter.skip. A journal that is a device (/dev/full reads as endless
    zeros) is refused by kind rather than read."""
    tally.fault = "disk full in the skip journal (CacheWriter.skip), a device as journal"
    tally.in_process = tally.runs = 1
    path = tmp_path / "c.h5"
    create_cache(path, ids=["a", "b"], systems=["s", "s"], splits=["train"] * 2,
                 labels=np.ones((2, 1), np.float32), label_names=["mos"], backbone="x@1",
                 dataset="d", config={}, feature_shapes={"audio": (4,)})
    with CacheWriter(path) as w:
        with file_size_limit(8), pytest.raises(CacheError, match="File too large.*rerun"):
            w.skip({"a": "broken"})
    assert CacheWriter(path).skipped == {}  # a torn line is ignored: the clip is retried
    if os.path.exists("/dev/full"):
        (tmp_path / "c.h5.journal").unlink()
        (tmp_path / "c.h5.journal").symlink_to("/dev/full")
        with pytest.raises(CacheError, match="a character device, not a journal"):
            CacheWriter(path)


def test_a_read_only_output_is_one_line(tmp_path, monkeypatch, tally):
    """evaluate writing its evaluations/ folder on a read-only mount was a traceback."""
    tally.fault = "read-only output: evaluate's evaluations/ (EROFS)"
    tally.in_process = True
    cache = make_synthetic_cache(tmp_path / "c.h5", **SMALL)
    tally.runs += 1
    assert cli("train", "--cache", cache, "--out", tmp_path / "r",
               "--max-epochs", "2").exit_code == 0
    before = tree_digest(tmp_path / "r")
    read_only(monkeypatch, tmp_path / "r" / "evaluations")
    tally.runs += 1
    one_line_error(cli("evaluate", tmp_path / "r"), "Read-only file system",
                   "choose a writable output")
    monkeypatch.undo()
    assert tree_digest(tmp_path / "r") == before


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for k in (0, 1):
        r = cli(*extract_args(corpus, root / "p.h5", "--shard", f"{k}/2"))
        assert r.exit_code == 0, r.output
    parts = [root / f"p.part-{k}-of-2.h5" for k in (0, 1)]
    whole = root / "whole.h5"
    assert cli("cache", "merge", *parts, "--out", whole).exit_code == 0
    return parts, whole


def test_cache_merge_onto_a_full_disk_is_one_line_not_a_segfault(shards, tmp_path, tally):
    """HDF5 failing while writing a new file's metadata printed six "Exception ignored"
    traces and then segfaulted at exit (139), 3 of 3: a child process, as that is the point."""
    tally.fault = "cache merge onto a full disk (file size limit 4 KB): no segfault"
    parts, whole = shards
    out = tmp_path / "m.h5"
    c = tally.child(["cache", "merge", *parts, "--out", out], preexec_fn=_small_disk(4_000))
    assert c.finish() == 1, (c.proc.returncode, c.stderr[-2000:])
    [line] = c.stderr.strip().splitlines()
    assert line.startswith("error: not enough disk space for the cache") and "4 KB" in line
    assert not out.exists() and leftovers(tmp_path) == []
    c = tally.invoke(["cache", "merge", *parts, "--out", out])  # the rerun: in this process
    assert c.proc.returncode == 0, c.stderr
    assert_same_file(out, whole)


def test_a_killed_merge_is_finished_by_the_same_command(shards, tmp_path, tally):
    """A killed merge left an INCOMPLETE cache that the same command then refused to replace
    ("exists; pass --force"), while cache info advised rerunning extract."""
    tally.fault = "cache merge killed before finishing, then rerun (no --force)"
    parts, whole = shards
    out = tmp_path / "m.h5"
    c = tally.child(["cache", "merge", *parts, "--out", out], child_env(FINISH=60))
    c.wait_line("qamro-fault: finish")
    c.kill()
    tally.runs += 1
    r = cli("cache", "info", out)
    assert "INCOMPLETE (rerun the command that made it, extract or cache merge" in r.output
    tally.runs += 1
    r = cli("cache", "merge", *parts, "--out", out)
    assert r.exit_code == 0, r.output
    assert_same_file(out, whole)
    tally.runs += 1  # a finished cache is still not replaced without --force
    one_line_error(cli("cache", "merge", *parts, "--out", out), "exists; pass --force")


def _shard_config(value):
    def mutate(f):
        config = json.loads(f.attrs["config"])
        config["shard"] = value
        f.attrs["config"] = json.dumps(config)
    return mutate


def _wider(f):
    n = f["ids"].shape[0]
    name = next(iter(f["features"]))
    dtype = f["features"][name].dtype
    width = f["features"][name].shape[1:]
    data = np.zeros((n, width[0] + 3, *width[1:]), dtype)
    del f["features"][name]
    f["features"].create_dataset(name, data=data)


@pytest.mark.parametrize("mutate, expect", [
    (_shard_config([0, 2]), "its 'shard' config is not a table"),
    (_shard_config({"index": "one", "count": 2}), "its 'shard' config is not a table"),
    (_wider, "differ from those of"),
], ids=["shard a list", "shard index a string", "another feature width"])
def test_crafted_shards_are_one_line(mutate, expect, shards, tmp_path, tally, request):
    tally.fault = f"cache merge of crafted shards ({request.node.callspec.id})"
    tally.in_process = tally.runs = 1
    parts, _ = shards
    bad = crafted(parts[1], tmp_path / parts[1].name, mutate)
    one_line_error(cli("cache", "merge", parts[0], bad, "--out", tmp_path / "m.h5"), expect)
    assert not (tmp_path / "m.h5").exists()


@pytest.mark.parametrize("command", ["extract --out", "cache merge --out"])
def test_read_only_cache_outputs_are_one_line(command, corpus, shards, tmp_path, monkeypatch,
                                              tally):
    """A new cache's folder on a read-only mount: its lock file cannot be made (a traceback
    before), nor the cache; one line, nothing left behind."""
    tally.fault = f"read-only output: {command} (EROFS)"
    tally.in_process = tally.runs = 1
    out = tmp_path / "ro" / "c.h5"
    out.parent.mkdir()
    args = (extract_args(corpus, out) if command.startswith("extract")
            else ["cache", "merge", *shards[0], "--out", out])
    read_only(monkeypatch, out.parent)
    one_line_error(cli(*args), "Read-only file system", "choose a writable output")
    monkeypatch.undo()
    assert sorted(out.parent.iterdir()) == []
