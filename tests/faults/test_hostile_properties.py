"""Issue 20, property-based: caches, run folders and manifests made by mutating valid ones
(hypothesis draws the mutations, derandomized so every run tries the same examples). For
each, the command either works or exits 1 with one `error:` line, no traceback; within a
bounded time and memory; and no file outside the command's output changes.

The example counts are small (the suite must stay fast); `--hypothesis-seed` or a larger
HYPOTHESIS_EXAMPLES environment variable tries more."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from kit.caches import make_synthetic_cache
from kit.hostile import cli, peak_python_mb, tree_digest

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "10"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
SECONDS = 30  # per command: the cases here take well under 2 s when they work
PEAK_MB = 300  # Python and numpy allocations per command (the valid files need a few MB)

JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6)
                       | st.floats(allow_nan=True) | st.text(max_size=12),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def check_outcome(r, elapsed: float, peak_mb: float) -> None:
    """Works (0), or exit 1 with one error line, no escaped exception, in bounded resources."""
    assert r.exit_code in (0, 1), (r.exit_code, r.output[-2000:], r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    if r.exit_code == 1:
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in r.output, r.stderr[-2000:]
    assert elapsed < SECONDS and peak_mb < PEAK_MB, (elapsed, peak_mb)


def timed(*args, memory: bool = True):
    """cli(*args) -> (result, seconds, peak MB); memory=False skips tracemalloc, which slows
    training several times over (the peak is then reported as 0)."""
    if not memory:
        t0 = time.monotonic()
        r = cli(*args)
        return r, time.monotonic() - t0, 0.0
    with peak_python_mb() as peak:
        t0 = time.monotonic()
        r = cli(*args)
    return r, time.monotonic() - t0, peak["mb"]


def unchanged_outside(root: Path, before: dict[str, str], *outputs: str) -> None:
    after = tree_digest(root)
    keep = lambda d: {k: v for k, v in d.items()  # noqa: E731
                      if not any(k == o or k.startswith(o) for o in outputs)}
    assert keep(after) == keep(before)


# -- caches ----------------------------------------------------------------------------------
DATASETS = ["ids", "systems", "splits", "labels", "features/audio", "features/text", "done",
            "system_mos/names", "system_mos/values"]
ATTRS = ["qamro_cache_version", "backbone", "dataset", "label_names", "config", "key",
         "created_by", "complete"]


@st.composite
def cache_mutation(draw):
    kind = draw(st.sampled_from(["attr", "delete", "replace", "nonfinite", "link", "bytes"]))
    if kind == "attr":
        name = draw(st.sampled_from(ATTRS))
        value = draw(JSONISH.map(json.dumps) | st.integers(-3, 3) | st.text(max_size=20))
        return kind, name, value
    if kind in ("delete", "replace", "nonfinite", "link"):
        name = draw(st.sampled_from(DATASETS))
        shape = tuple(draw(st.lists(st.integers(0, 30), max_size=3)))
        dtype = draw(st.sampled_from(["f4", "f2", "i8", "u1", "f8"]))
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return kind, name, (shape, dtype, value)
    return kind, draw(st.integers(0, 10**6)), draw(st.binary(min_size=1, max_size=64))


def apply_cache_mutation(path: Path, mutation) -> None:
    kind, name, value = mutation
    if kind == "bytes":
        data = bytearray(path.read_bytes())
        at = name % len(data)
        data[at:at + len(value)] = value
        path.write_bytes(bytes(data[:max(len(data), 1)]))
        return
    with h5py.File(path, "r+", locking=False) as f:
        if kind == "attr":
            f.attrs[name] = value
        elif name not in f:
            return
        elif kind == "delete":
            del f[name]
        elif kind == "replace":
            shape, dtype, _ = value
            del f[name]
            f.create_dataset(name, data=np.ones(shape, dtype))
        elif kind == "nonfinite" and f[name].dtype.kind == "f" and f[name].size:
            v = f[name][()]
            v.flat[0] = value[2]
            f[name][...] = v
        elif kind == "link":
            del f[name]
            f[name] = h5py.SoftLink("/ids")


@pytest.fixture(scope="module")
def valid_cache(tmp_path_factory):
    path = make_synthetic_cache(tmp_path_factory.mktemp("prop") / "c.h5", n_systems=4,
                                per_system=6, dim=8)
    # warm up: the first training of a process imports torch and the plotting stack
    assert cli("train", "--cache", path, "--out", path.parent / "warm", "--max-epochs", "1",
               "--quiet").exit_code == 0
    return path


@SETTINGS
@given(mutations=st.lists(cache_mutation(), min_size=1, max_size=3))
def test_mutated_caches_work_or_are_one_line(valid_cache, mutations, tally):
    tally.fault = f"property: caches mutated from a valid one ({EXAMPLES} examples; cache " \
                  f"info, then train where it reads)"
    tally.in_process = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "c.h5"
        shutil.copy(valid_cache, path)
        for m in mutations:
            try:
                apply_cache_mutation(path, m)
            except (OSError, ValueError, TypeError, KeyError, RuntimeError):
                pass  # a mutation h5py could not make (the file is already broken): go on
        before = tree_digest(root)
        tally.runs += 1
        r, elapsed, peak = timed("cache", "info", path)
        check_outcome(r, elapsed, peak)
        unchanged_outside(root, before)
        if r.exit_code == 0:  # it reads: training on it must work or be one line too
            tally.runs += 1
            r, elapsed, peak = timed("train", "--cache", path, "--out", root / "run",
                                     "--max-epochs", "2", "--quiet", memory=False)
            check_outcome(r, elapsed, peak)
            unchanged_outside(root, before, "run", ".run")


# -- run folders -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_run(valid_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("prop-run") / "run"
    r = cli("train", "--cache", valid_cache, "--out", out, "--max-epochs", "2", "--quiet")
    assert r.exit_code == 0, r.output
    return out


@st.composite
def run_mutation(draw):
    kind = draw(st.sampled_from(["config-set", "config-drop", "tensor-add", "tensor-drop",
                                 "tensor-shape", "bytes"]))
    if kind == "config-set":
        path = draw(st.lists(st.sampled_from(["heads", "members", "train", "label_stats", 0,
                                              "name", "loss", "hidden", "cache"]),
                             min_size=1, max_size=3))
        return kind, path, draw(JSONISH)
    if kind == "config-drop":
        return kind, draw(st.sampled_from(["heads", "members", "train", "cache", "backbone",
                                           "cache_key", "label_stats", "cache_rows"])), None
    if kind in ("tensor-add", "tensor-drop", "tensor-shape"):
        return kind, draw(st.text(min_size=1, max_size=20)), draw(
            st.lists(st.integers(0, 5), min_size=1, max_size=3))
    return kind, draw(st.sampled_from(["config.json", "heads.safetensors"])), (
        draw(st.integers(0, 10**6)), draw(st.binary(min_size=1, max_size=32)))


def apply_run_mutation(folder: Path, mutation) -> None:
    kind, where, value = mutation
    if kind.startswith("config"):
        config = json.loads((folder / "config.json").read_text())
        if kind == "config-drop":
            config.pop(where, None)
        else:
            node = config
            for key in where[:-1]:
                if isinstance(node, dict) and key in node:
                    node = node[key]
                elif isinstance(node, list) and isinstance(key, int) and key < len(node):
                    node = node[key]
            if isinstance(node, dict):
                node[where[-1]] = value
            elif isinstance(node, list) and node:
                node[0] = value
        (folder / "config.json").write_text(json.dumps(config))
    elif kind.startswith("tensor"):
        tensors = load_file(str(folder / "heads.safetensors"))
        keys = sorted(tensors)
        if kind == "tensor-add":
            tensors[where] = torch.zeros(value)
        elif kind == "tensor-drop":
            tensors.pop(keys[len(where) % len(keys)])
        else:
            tensors[keys[len(where) % len(keys)]] = torch.zeros(value)
        save_file(tensors, str(folder / "heads.safetensors"))
    else:
        at, data = value
        raw = bytearray((folder / where).read_bytes())
        raw[at % len(raw):at % len(raw) + len(data)] = data
        (folder / where).write_bytes(bytes(raw))


@SETTINGS
@given(mutations=st.lists(run_mutation(), min_size=1, max_size=2))
def test_mutated_run_folders_work_or_are_one_line(valid_run, mutations, tally):
    tally.fault = f"property: run folders mutated from a valid one ({EXAMPLES} examples; " \
                  f"evaluate)"
    tally.in_process = True
    tally.runs += 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "run"
        shutil.copytree(valid_run, folder)
        for m in mutations:
            try:
                apply_run_mutation(folder, m)
            except Exception:  # noqa: BLE001  a mutation a broken file no longer allows
                pass
        before = tree_digest(root)
        r, elapsed, peak = timed("evaluate", folder)
        check_outcome(r, elapsed, peak)
        unchanged_outside(root, before, "run/evaluations/")


# -- manifests ---------------------------------------------------------------------------------
@st.composite
def manifest_mutation(draw):
    kind = draw(st.sampled_from(["insert", "delete", "duplicate-line", "replace-cell"]))
    at = draw(st.integers(0, 10**6))
    text = draw(st.text(alphabet=st.characters(codec="utf-8"), max_size=8)
                | st.sampled_from([",", "\n", '"', "\x00", "nan", "inf", "1e999", "9" * 5000,
                                   "[" * 5000, "\ufeff", "\r"]))
    return kind, at, text


def apply_manifest_mutation(text: str, mutation) -> str:
    kind, at, piece = mutation
    i = at % (len(text) + 1)
    if kind == "insert":
        return text[:i] + piece + text[i:]
    if kind == "delete":
        return text[:i] + text[i + len(piece) + 1:]
    lines = text.splitlines(keepends=True)
    j = at % len(lines)
    if kind == "duplicate-line":
        return "".join(lines[:j + 1] + [lines[j]] + lines[j + 1:])
    cells = lines[j].rstrip("\n").split(",")
    cells[at % len(cells)] = piece
    lines[j] = ",".join(cells) + "\n"
    return "".join(lines)


@pytest.fixture(scope="module")
def wavs(corpus):
    return sorted((corpus / "wav").iterdir())[:3]


@SETTINGS
@given(mutations=st.lists(manifest_mutation(), min_size=1, max_size=3),
       jsonl=st.booleans())
def test_mutated_manifests_work_or_are_one_line(wavs, mutations, jsonl, tally):
    tally.fault = f"property: CSV and JSONL manifests mutated from a valid one ({EXAMPLES} " \
                  f"examples; extract)"
    tally.in_process = True
    tally.runs += 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = [dict(id=f"c{i}", path=str(w), system=f"S{i % 2}", mos=2.0 + i)
                for i, w in enumerate(wavs)]
        if jsonl:
            text = "".join(json.dumps(r) + "\n" for r in rows)
        else:
            text = "id,path,system,mos\n" + "".join(
                f"{r['id']},{r['path']},{r['system']},{r['mos']}\n" for r in rows)
        for m in mutations:
            text = apply_manifest_mutation(text, m)
        manifest = root / ("m.jsonl" if jsonl else "m.csv")
        manifest.write_bytes(text.encode("utf-8", "surrogatepass"))
        before = tree_digest(root)
        r, elapsed, peak = timed("extract", "--manifest", manifest, "--backbone", "melstats",
                                 "--device", "cpu", "--workers", "0", "--quiet",
                                 "--out", root / "out.h5")
        check_outcome(r, elapsed, peak)
        unchanged_outside(root, before, "out.h5", ".out.h5")
