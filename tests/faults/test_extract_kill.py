"""Issue 5.1: an extraction killed (SIGKILL) or interrupted (Ctrl-C) anywhere resumes, redoes
at most the batch in flight, and ends with exactly the cache of an uninterrupted run."""
from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from qamro_pipe.store.files import journal_path
from qamro_pipe.store.reader import read_cache
from qamro_pipe.store.writer import CacheWriter, create_cache

from kit.children import (
    BATCH_CLIPS,
    N_CLIPS,
    assert_same_file,
    child_env,
    done_rows,
    extract_args,
    leftovers,
    snapshot,
)


def _check_after_stop(c, out: Path, before: set[int], reference: Path) -> set[int]:
    """What must hold after any stop: a readable file (or none yet), nothing done lost, no
    done row rewritten, at most one batch written but not done, done rows hold the exact
    reference values."""
    after = done_rows(out)
    assert before <= after, "rows marked done were lost"
    written = c.rows_written()
    assert not set(written) & before, f"rows done before this run were redone: {written}"
    in_flight = set(written) - after
    assert len(in_flight) <= BATCH_CLIPS, f"more than one batch lost: {sorted(in_flight)}"
    if out.exists():
        cache = read_cache(out, require_complete=False)  # readable, validated
        assert set(np.flatnonzero(cache.usable).tolist()) == after
        ref = read_cache(reference)
        rows = sorted(after)
        for k in ref.features:
            assert np.array_equal(cache.features[k][rows], ref.features[k][rows]), k
    assert "Traceback" not in c.stderr
    return after


def test_sigkill_at_many_points_resumes_to_the_same_cache(corpus, reference, tmp_path, tally):
    tally.fault = "SIGKILL during extract (start-up, create, mid-write x2, between " \
                  "batches, random time, finishing)"
    out = tmp_path / "c.h5"
    args = extract_args(corpus, out)
    rng = random.Random(5)
    done: set[int] = set()
    redone = 0

    def step(env, stop):
        nonlocal done, redone
        c = tally.child(args, env)
        stop(c)
        rc = c.kill()
        assert rc == -signal.SIGKILL, f"the run ended before the kill: {c.stderr}"
        after = _check_after_stop(c, out, done, reference)
        redone += len(set(c.rows_written()) - after)
        done = after
        return c

    # 1. early: start-up, or just after the cache was created
    step(child_env(WRITE=0), lambda c: time.sleep(0.1))
    # 2. while creating the cache: the new file is written but not yet renamed into place
    c = step(child_env(CREATE=30, WRITE=0), lambda c: c.wait_line("qamro-fault: create"))
    assert not out.exists() and leftovers(tmp_path) == [f".c.h5.tmp-{c.pid}"]
    # 3. in an HDF5 write: batch 2's rows are on disk, its /done not yet flipped
    c = step(child_env(WRITE=1.0), lambda c: c.wait_line("qamro-fault: write", 2))
    assert leftovers(tmp_path) == [], "the killed create's temporary was not cleared"
    assert len(done) == BATCH_CLIPS and len(c.rows_written()) == 2 * BATCH_CLIPS
    # 4. between batches (a random instant after the 3rd write of this run)
    step(child_env(WRITE=0.05),
         lambda c: (c.wait_line("qamro-fault: write", 3), time.sleep(rng.uniform(0, 0.05))))
    # 5. at a random time
    step(child_env(WRITE=0.1), lambda c: time.sleep(rng.uniform(1.0, 2.0)))
    # 6. in an HDF5 write again, the first batch of this run
    before = set(done)
    step(child_env(WRITE=1.0), lambda c: c.wait_line("qamro-fault: write", 1))
    assert done == before
    # 7. finishing: every row done, not yet marked complete
    step(child_env(WRITE=0, FINISH=30), lambda c: c.wait_line("qamro-fault: finish"))
    assert len(done) == N_CLIPS and not read_cache(out, require_complete=False).meta.complete
    # the last run only finishes
    c = tally.invoke(args, WRITE=0)
    assert c.proc.returncode == 0, c.stderr
    assert c.rows_written() == [] and f"{N_CLIPS} were already done" in c.stdout
    assert redone <= 7 * BATCH_CLIPS  # each kill loses at most the batch it was writing
    assert_same_file(out, reference)
    assert leftovers(tmp_path) == [] and not journal_path(out).exists()


def test_ctrl_c_says_how_to_resume_and_resumes(corpus, reference, tmp_path, tally):
    tally.fault = "Ctrl-C (SIGINT) during extract, mid-write and between batches"
    out = tmp_path / "c.h5"
    args = extract_args(corpus, out)
    c = tally.child(args, child_env(WRITE=1.0))
    c.wait_line("qamro-fault: write", 2)
    c.signal(signal.SIGINT)
    assert c.finish() == 130  # the shell's code for Ctrl-C
    assert c.stderr.strip().splitlines()[-1] == (
        f"interrupted: {BATCH_CLIPS}/{N_CLIPS} clips are safely in {out}; rerun the "
        f"same command to resume")
    done = _check_after_stop(c, out, set(), reference)
    c = tally.child(args, child_env(WRITE=0.1))
    c.wait_line("qamro-fault: write", 3)
    time.sleep(random.Random(1).uniform(0, 0.1))
    c.signal(signal.SIGINT)
    assert c.finish() == 130 and "rerun the same command to resume" in c.stderr
    done = _check_after_stop(c, out, done, reference)
    assert BATCH_CLIPS * 3 <= len(done) < N_CLIPS
    c = tally.invoke(args)
    assert c.proc.returncode == 0, c.stderr
    assert f"{len(done)} were already done" in c.stdout
    assert_same_file(out, reference)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_sigkill_with_decoding_workers_leaves_no_orphan_holding_the_cache(
        corpus, reference, tmp_path, tally):
    tally.fault = "SIGKILL during extract with 2 decoding workers (orphans, lock)"
    out = tmp_path / "c.h5"
    args = extract_args(corpus, out, "--workers", "2")
    c = tally.child(args, child_env(WRITE=1.0))
    c.wait_line("qamro-fault: write", 1)
    workers = _children(c.pid)
    assert workers, "expected decoding worker processes"
    c.kill()
    deadline = time.monotonic() + 5
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "decoding workers outlived the killed parent"
    c = tally.invoke(args)  # not refused as "another process is writing"
    assert c.proc.returncode == 0, c.stderr
    a, b = snapshot(out), snapshot(reference)
    for k in b:
        if k.startswith("features/") or k in ("ids", "labels", "done"):
            assert np.array_equal(a[k], b[k]), k


def _raw_extents(path: Path) -> list[tuple[int, int]]:
    spans = []
    with h5py.File(path, "r", locking=False) as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
                spans.append((obj.id.get_offset(), obj.id.get_storage_size()))
        f.visititems(visit)
    return spans


def _changed(a: bytes, b: bytes) -> np.ndarray:
    assert len(a) == len(b), "the file changed size"
    return np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))


def test_extraction_changes_only_raw_bytes_so_a_kill_cannot_tear_hdf5(tmp_path, tally):
    """Why a SIGKILL at any instant leaves a readable file: between creation and the final
    `complete` flip, the only bytes that change lie inside preallocated contiguous datasets;
    HDF5's metadata (headers, B-trees, heaps, superblock) is never rewritten."""
    tally.fault = "HDF5 metadata untouched while extracting (byte-level check)"
    tally.in_process, tally.runs = True, 3
    p = tmp_path / "c.h5"
    n = 6
    create_cache(p, ids=[f"c{i}" for i in range(n)], systems=["s"] * n, splits=["train"] * n,
                 labels=np.ones((n, 1)), label_names=["q"], backbone="b@1", dataset="d",
                 config={}, feature_shapes={"audio": (4,)}, window_shapes={"layers": (2, 3)},
                 window_counts=[1, 2, 1, 1, 3, 1], sources=[f"/a/c{i}.wav" for i in range(n)],
                 source_stat=np.zeros((n, 2)))
    spans = _raw_extents(p)
    start = p.read_bytes()
    with CacheWriter(p) as w:  # rows, their audio's (size, mtime) and a skip's
        w.write([3, 0], {"audio": np.ones((2, 4))},
                {"layers": [np.ones((1, 2, 3)), np.ones((1, 2, 3))]}, [np.ones(1), np.ones(1)],
                stats=np.array([[10, 11], [12, 13]]))
        w.skip({"c5": "bad file"}, {"c5": (14, 15)})  # the reason goes to the journal
    mid = p.read_bytes()
    changed = _changed(start, mid)
    assert len(changed) > 0
    assert all(any(o <= i < o + s for o, s in spans) for i in changed), \
        "bytes outside the datasets' raw data changed"
    assert read_cache(p, require_complete=False).source_stat[[0, 3, 5]].tolist() == [
        [12, 13], [10, 11], [14, 15]]
    assert journal_path(p).exists()
    with CacheWriter(p) as w:
        w.write([1, 2, 4], {"audio": np.ones((3, 4))},
                {"layers": [np.ones((2, 2, 3)), np.ones((1, 2, 3)), np.ones((3, 2, 3))]},
                [np.ones(2), np.ones(1), np.ones(3)])
        before_finish = p.read_bytes()
        inode = p.stat().st_ino
        w.finish()
    # with a skipped clip, finish writes a copy and renames it: the old inode is never torn
    assert p.stat().st_ino != inode and not journal_path(p).exists()
    c = read_cache(p)
    assert c.skipped == {"c5": "bad file"} and c.usable.tolist() == [1, 1, 1, 1, 1, 0]
    # without skips, finish flips the `complete` attribute in place: a byte or so
    q = tmp_path / "d.h5"
    create_cache(q, ids=["a"], systems=["s"], splits=["train"], labels=np.ones((1, 1)),
                 label_names=["q"], backbone="b@1", dataset="d", config={},
                 feature_shapes={"audio": (4,)})
    with CacheWriter(q) as w:
        w.write([0], {"audio": np.ones((1, 4))})
        before = q.read_bytes()
        w.finish()
    assert 0 < len(_changed(before, q.read_bytes())) <= 8
    assert read_cache(q).meta.complete
    del before_finish
