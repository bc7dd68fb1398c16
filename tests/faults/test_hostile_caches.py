"""Issue 20: crafted caches. Bytes kept outside the file (external storage, external and soft
links, virtual datasets) are refused on read and on resume, so extraction never writes into
another file; a small file cannot declare memory it does not hold; a FIFO does not hang;
malformed metadata is one line. In-process (CliRunner), on small synthetic caches."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from qamro_pipe.errors import CacheError
from qamro_pipe.store import CacheWriter

from kit.caches import make_synthetic_cache
from kit.children import extract_args
from kit.hostile import cli, crafted, one_line_error, peak_python_mb, within


@pytest.fixture
def base(tmp_path):
    return make_synthetic_cache(tmp_path / "base.h5", n_systems=4, per_system=6, dim=8)


def _external_storage(victim):
    def mutate(f):
        shape = f["features/audio"].shape
        del f["features/audio"]
        f["features"].create_dataset("audio", shape=shape, dtype="f4",
                                     external=[(str(victim), 0, h5py.h5f.UNLIMITED)])
    return mutate


def _external_link(target):
    def mutate(f):
        del f["features/audio"]
        f["features/audio"] = h5py.ExternalLink(str(target), "/features/audio")
    return mutate


def _soft_link(f):
    del f["features/audio"]
    f["features/audio"] = h5py.SoftLink("/features/text")


def _virtual(target):
    def mutate(f):
        shape = f["features/audio"].shape
        del f["features/audio"]
        layout = h5py.VirtualLayout(shape=shape, dtype="f4")
        layout[:] = h5py.VirtualSource(str(target), "features/audio", shape=shape)
        f["features"].create_virtual_dataset("audio", layout)
    return mutate


def _other_cache(tmp_path):
    return make_synthetic_cache(tmp_path / "other.h5", n_systems=4, per_system=6, dim=8, seed=5)


OUTSIDE = {
    "external storage": (lambda tmp: _external_storage(tmp / "victim.bin"),
                         "keeps its bytes in another file"),
    "external link": (lambda tmp: _external_link(_other_cache(tmp)), "is an external link"),
    "soft link": (lambda tmp: _soft_link, "is a soft link"),
    "virtual dataset": (lambda tmp: _virtual(_other_cache(tmp)), "is a virtual dataset"),
}


@pytest.mark.parametrize("kind", list(OUTSIDE))
def test_storage_outside_the_file_is_refused_on_read(kind, base, tmp_path, tally):
    tally.fault = f"crafted cache, {kind}: cache info, train (one line)"
    tally.in_process = True
    (tmp_path / "victim.bin").write_bytes(np.arange(24 * 8, dtype=np.float32).tobytes())
    make, expect = OUTSIDE[kind]
    path = crafted(base, tmp_path / "crafted.h5", make(tmp_path))
    for args in (["cache", "info", path],
                 ["train", "--cache", path, "--out", tmp_path / "run", "--max-epochs", "2"]):
        tally.runs += 1
        one_line_error(cli(*args), str(path), "/features/audio", expect)
    assert not (tmp_path / "run").exists()


def test_resuming_a_cache_with_external_storage_writes_nothing_outside_it(corpus, tmp_path,
                                                                          tally):
    """The attack of issue 20: an unfinished cache whose features/audio keeps its bytes in
    victim.txt; resuming it used to write float32 features over victim.txt, exit 0."""
    tally.fault = "resume an unfinished cache whose features live in another file (extract)"
    tally.in_process = True
    out = tmp_path / "crafted.h5"
    tally.runs += 1
    r = cli(*extract_args(corpus, out))
    assert r.exit_code == 0, r.output
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n" * 2000)
    before = victim.read_bytes()

    def unfinished(f):
        _external_storage(victim)(f)
        f["done"][:] = 0
        f.attrs["complete"] = False
    crafted(out, out, unfinished)
    tally.runs += 1
    one_line_error(cli(*extract_args(corpus, out)), "keeps its bytes in another file",
                   str(victim))
    with pytest.raises(CacheError, match="another file"):  # the writer itself refuses too
        CacheWriter(out)
    assert victim.read_bytes() == before


def _bomb(f):
    n = f["ids"].shape[0]
    del f["features/audio"]
    f["features"].create_dataset("audio", shape=(n, 1 << 22), dtype="f4",
                                 compression="gzip", chunks=(1, 1 << 16))


def _unallocated(f):
    n = f["ids"].shape[0]
    del f["features/text"]
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_LATE)  # declared, never written: no bytes at all
    h5py.h5d.create(f["features"].id, b"text", h5py.h5t.IEEE_F32LE,
                    h5py.h5s.create_simple((n, 1 << 22)), dcpl=dcpl)


@pytest.mark.parametrize("mutate", [_bomb, _unallocated], ids=["gzip", "unallocated"])
def test_declared_size_is_checked_before_reading(mutate, base, tmp_path, tally):
    tally.fault = f"small cache declaring 400 MB of features ({mutate.__name__[1:]}): memory"
    tally.in_process = True
    tally.runs += 1
    path = crafted(base, tmp_path / "bomb.h5", mutate)
    assert path.stat().st_size < 200_000
    with peak_python_mb() as peak:
        r = cli("cache", "info", path)
    one_line_error(r, str(path), "declares", "at most 16 times its file's size")
    assert peak["mb"] < 50, peak


def test_a_fifo_named_as_a_cache_is_refused_not_waited_on(tmp_path, tally):
    tally.fault = "a FIFO named as a cache (cache info, train --cache): no hang"
    tally.in_process = True
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    for args in (["cache", "info", fifo], ["train", "--cache", fifo, "--out", tmp_path / "r"]):
        tally.runs += 1
        one_line_error(within(20, lambda: cli(*args), fifo),
                       f"{fifo}: a named pipe (FIFO), not a cache file")
    tally.runs += 1
    one_line_error(cli("cache", "info", tmp_path), "a folder")


def _attr(name, value):
    def mutate(f):
        f.attrs[name] = value
    return mutate


def _scalar_features(f):
    del f["features/audio"]
    f["features"].create_dataset("audio", data=np.float32(1.0))


def _inf_label(f):
    labels = f["labels"][()]
    labels[3, 0] = np.inf
    f["labels"][...] = labels


def _group_as_features(f):
    del f["features/audio"]
    f["features"].create_group("audio")


MALFORMED = {
    "config is a JSON list": (_attr("config", "[1, 2]"), "attribute 'config' is a JSON list"),
    "label_names not a list": (_attr("label_names", '{"a": 1}'), "expected a JSON list"),
    "duplicate label names": (_attr("label_names", '["overall", "overall"]'), "appears twice"),
    "label name with /": (_attr("label_names", '["a/b", "textual"]'), "holds '/'"),
    "label name with an escape": (_attr("label_names", json.dumps(["\x1b]0;pwned\x07", "t"])),
                                  "\\x1b]0;pwned\\x07"),
    "scalar features/audio": (_scalar_features, "features/audio is float32()"),
    "group as features/audio": (_group_as_features, "features/audio is a group"),
    "inf label": (_inf_label, "/labels holds inf for 1 clip(s)"),
}


def test_malformed_caches_are_one_line(base, tmp_path, tally):
    tally.fault = f"crafted cache metadata ({len(MALFORMED)} kinds: config list, label names, " \
                  f"scalar features, inf label, ...)"
    tally.in_process = True
    for i, (kind, (mutate, expect)) in enumerate(MALFORMED.items()):
        path = crafted(base, tmp_path / f"m{i}.h5", mutate)
        for args in (["cache", "info", path],
                     ["train", "--cache", path, "--out", tmp_path / f"r{i}", "--max-epochs", "2"]):
            tally.runs += 1
            r = cli(*args)
            assert r.exit_code == 1, (kind, args[0], r.output, r.exception)
            one_line_error(r, expect)
        assert not (tmp_path / f"r{i}").exists()
