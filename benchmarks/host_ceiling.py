"""The host ceiling of extraction: what the process that feeds the model costs per clip, with
a model that costs nothing (null_backbone.py), and the decoding workers' own rate.

For each shape (CLAP: 48 kHz windows and texts; Aesthetics: 16 kHz windows, [13, 768] per
window) and clip length (10 s, 30 s), in a child process whose first path entry is the tree
measured (this one, or an earlier commit's package exported with `git archive`):
  decode only   the workers alone on the same clips (the consumer takes each clip's windows
                and lets go): clips/s
  null pipeline `extract` with the zero-cost backbone, same workers, same clips: clips/s,
                and the feeding process's CPU per clip outside the forward
                (each run REPEATS times, alternating, the best kept: the machine is shared)
  breakdown     the same run again, every phase of the feeding process timed exclusively
                (time.thread_time of the main thread; the rest of the process's CPU is its
                other threads, such as the process pool's manager)

    python benchmarks/host_ceiling.py [--before REV] [--clips 256] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

# the package of the tree measured: in a child, the first entry of PYTHONPATH
import null_backbone  # noqa: F401  (registers the zero-cost backbones)

from qamro_pipe.config import ExtractConfig
from qamro_pipe.extract.backbones import get_backbone
from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.extract.datasets.demo import write_demo_corpus
from qamro_pipe.extract.loop import auto_workers, extract

HERE = Path(__file__).resolve().parent
SHAPES = {"clap": "null-clap", "aesthetics": "null-aesthetics"}
BATCH = 64  # the GPU default (config.EXTRACT_BATCH["cuda"])
REPEATS = 3  # null pipeline runs per measurement, the best kept (a shared machine)

# (module, attribute, phase): what each phase of the feeding process is, in either layout of
# the package (before issue 22: everything in extract/loop.py); missing names are skipped
PHASES = [
    ("qamro_pipe.extract.loop", "_Decoder.__next__", "gather decoded audio"),
    ("qamro_pipe.extract.loop", "_Decoder.release", "gather decoded audio"),
    ("qamro_pipe.extract.decoding", "Decoder.__next__", "gather decoded audio"),
    ("qamro_pipe.extract.decoding", "Decoder.release", "gather decoded audio"),
    ("qamro_pipe.extract.audio", "windows", "windowing"),
    ("null_backbone", "_Null._prepare", "build the model's input"),
    ("qamro_pipe.extract.backbones.clap", "ClapMusic._prepare", "build the model's input"),
    ("qamro_pipe.extract.backbones.aesthetics", "Aesthetics._prepare",
     "build the model's input"),
    ("null_backbone", "NullClap._embed_texts", "texts (tokenizer)"),
    ("null_backbone", "_Null._forward", "forward (zero cost)"),
    ("qamro_pipe.extract.backbones.base", "Pending.__init__", "collect features"),
    ("qamro_pipe.extract.backbones.base", "Pending.result", "collect features"),
    ("qamro_pipe.extract.loop", "_launch", "launch a batch (other)"),
    ("qamro_pipe.extract.batches", "launch", "launch a batch (other)"),
    ("qamro_pipe.extract.loop", "_write", "pool, check"),
    ("qamro_pipe.extract.batches", "write_batch", "pool, check"),
    ("qamro_pipe.store.writer", "CacheWriter.write", "write rows, flip done"),
    ("qamro_pipe.store.writer", "CacheWriter._sync", "fsync"),
    ("qamro_pipe.store.writer", "CacheWriter.skip", "journal"),
    ("tqdm", "tqdm.update", "progress"),
]
IN_LOOP = "batch loop (other)"
LOOP = [("qamro_pipe.extract.loop", "_embed"), ("qamro_pipe.extract.loop", "embed_batches")]


class PhaseClock:
    """Exclusive CPU and wall time per phase of the main thread: time inside a wrapped call
    goes to its phase, minus the wrapped calls inside it."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.main = threading.get_ident()
        self.t = (0.0, 0.0)

    def _charge(self) -> None:
        now = (time.thread_time(), time.perf_counter())
        if self.stack:
            self.cpu[self.stack[-1]] += now[0] - self.t[0]
            self.wall[self.stack[-1]] += now[1] - self.t[1]
        self.t = now

    def wrap(self, fn, phase):
        def timed(*a, **k):  # only inside the batch loop: start-up (the fork) is not per clip
            if threading.get_ident() != self.main or not (self.stack or phase == IN_LOOP):
                return fn(*a, **k)
            self._charge()
            self.stack.append(phase)
            try:
                return fn(*a, **k)
            finally:
                self._charge()
                self.stack.pop()
        return timed


@contextlib.contextmanager
def patched(clock: PhaseClock | None, process: dict):
    """Wrap the phases (with a clock) and the batch loop (always: the process's CPU time
    inside it goes to `process`)."""
    undo = []

    def put(owner, attr, value):
        undo.append((owner, attr, owner.__dict__[attr]))
        setattr(owner, attr, value)

    def find(mod, dotted):
        try:
            owner = importlib.import_module(mod)
        except ImportError:
            return None, None
        *path, attr = dotted.split(".")
        for p in path:
            owner = getattr(owner, p, None)
        if owner is None or attr not in getattr(owner, "__dict__", {}):
            return None, None
        return owner, attr

    for mod, dotted, phase in PHASES if clock else []:
        owner, attr = find(mod, dotted)
        if owner is not None:
            put(owner, attr, clock.wrap(owner.__dict__[attr], phase))
    if clock is None:  # the zero-cost forward's own time is taken out of the host's
        owner, attr = find("null_backbone", "_Null._forward")
        forward = owner.__dict__[attr]

        def timed_forward(*a, **k):
            t = time.process_time()
            try:
                return forward(*a, **k)
            finally:
                process["forward_cpu"] += time.process_time() - t
        put(owner, attr, timed_forward)
    for mod, name in LOOP:
        owner, attr = find(mod, name)
        if owner is None:
            continue
        inner = owner.__dict__[attr]
        inner = clock.wrap(inner, IN_LOOP) if clock else inner

        def loop(*a, _inner=inner, **k):
            t = time.process_time(), time.thread_time()
            try:
                return _inner(*a, **k)
            finally:
                process["cpu"] += time.process_time() - t[0]
                process["main_cpu"] += time.thread_time() - t[1]
        put(owner, attr, loop)
    try:
        yield
    finally:
        for owner, attr, value in reversed(undo):
            setattr(owner, attr, value)


def decode_only(records, bb, workers: int) -> float:
    """clips/s of the decoding workers alone, as extract drives them (same tasks, same slots)."""
    try:  # the tree measured may be one from before loop.py was split (issue 18)
        from qamro_pipe.extract.decoding import Decoder, decode_tasks
        tasks = decode_tasks(records.clips, range(len(records.clips)), bb)
    except ImportError:
        from qamro_pipe.extract.loop import _Decoder as Decoder
        tasks = [(r, str(c.path), bb.decode_rate, c.start, c.end, bb.max_frames)
                 for r, c in enumerate(records.clips)]
    dec = Decoder(tasks, workers, bb.window_samples, ahead=max(8, 4 * workers, BATCH),
                  held=BATCH)
    try:
        first = next(dec)  # the workers are forked and busy: time from the first clip on
        t, n = time.perf_counter(), 0
        for row, wins, err in dec:
            assert err is None and len(wins) > 0
            dec.release([row])
            n += 1
        rate = n / (time.perf_counter() - t)
        dec.release([first[0]])
    finally:
        dec.close()
    return rate


def child(root: str, backbone: str, workers: int, tok: str, out: str) -> None:
    """One measurement in this process (the tree measured first on sys.path). The machine
    is shared and others' work only ever adds to a figure, so the null pipeline runs REPEATS
    times, each followed by the decoders alone, and the best of each is kept: the least CPU
    per clip, the highest rates (every run is in the JSON)."""
    recs = load_dataset("musiceval", root)
    cfg = ExtractConfig(backbone=backbone, checkpoint="random", tokenizer_dir=tok,
                        device="cpu", batch_size=BATCH, workers=workers)
    warm = dataclasses.replace(recs, clips=recs.clips[:2 * BATCH // 3 + 1])
    extract(warm, cfg, Path(out) / "warm.h5", progress=False)  # imports, first allocations
    bb = get_backbone(backbone, checkpoint="random")
    runs: dict[str, list[float]] = {"decode_only_clips_per_s": [decode_only(recs, bb, workers)],
                                    "null_pipeline_clips_per_s": [], "host_ms_per_clip": [],
                                    "host_ms_per_clip_main_thread": []}
    for r in range(REPEATS):
        process = {"cpu": 0.0, "main_cpu": 0.0, "forward_cpu": 0.0}
        with patched(None, process):
            s = extract(recs, cfg, Path(out) / f"plain-{r}.h5", progress=True)
        n = s.written
        runs["null_pipeline_clips_per_s"].append(n / s.seconds)
        runs["host_ms_per_clip"].append((process["cpu"] - process["forward_cpu"]) / n * 1e3)
        runs["host_ms_per_clip_main_thread"].append(
            (process["main_cpu"] - process["forward_cpu"]) / n * 1e3)
        runs["decode_only_clips_per_s"].append(decode_only(recs, bb, workers))
    res = {"clips": len(recs.clips), "runs": runs,
           **{k: (max if k.endswith("per_s") else min)(v) for k, v in runs.items()}}
    clock = PhaseClock()
    process = {"cpu": 0.0, "main_cpu": 0.0, "forward_cpu": 0.0}
    with patched(clock, process):
        s = extract(recs, cfg, Path(out) / "phases.h5", progress=True)
    n = s.written
    other = process["cpu"] - process["main_cpu"]
    res["phases_ms_per_clip"] = {
        **{k: {"cpu": v / n * 1e3, "wall": clock.wall[k] / n * 1e3}
           for k, v in sorted(clock.cpu.items(), key=lambda kv: -kv[1])},
        "other threads of the feeding process": {"cpu": other / n * 1e3, "wall": 0.0}}
    res["phases_total_cpu_ms_per_clip"] = process["cpu"] / n * 1e3
    print(json.dumps(res))


def run_child(tree: Path, root: Path, backbone: str, workers: int, tok: str, tmp: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=tmp))
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, __file__, "--child", str(root), backbone, str(workers),
                        tok, str(out)], capture_output=True, text=True, env=env, cwd=tree)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def export_tree(rev: str, into: Path) -> Path:
    """The package as it was at `rev`, as files (git archive), to measure it beside this one."""
    into.mkdir(parents=True)
    repo = HERE.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "qamro_pipe"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure(clips: int = 256, before: str | None = None, workers: int | None = None,
            shapes=("clap", "aesthetics"), lengths=(10.0, 30.0)) -> dict:
    """{tree: {shape-length: figures}} for this tree ("after") and, with `before`, that
    revision ("before"), alternating, in this one run."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from kit.backbones import write_roberta_style_tokenizer  # tests/ is not a package

    workers = workers or auto_workers(gpu=True)  # what a GPU run on this machine gets
    out: dict = {"workers": workers, "batch": BATCH, "clips": clips, "cpus": os.cpu_count(),
                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = str(write_roberta_style_tokenizer(tmp / "tokenizer"))
        trees = {"after": HERE.parent}
        if before:
            trees = {"before": export_tree(before, tmp / "before"), **trees}
            out["before_rev"] = before
        for seconds in lengths:
            n = clips if seconds <= 10 else max(BATCH, clips // 2)
            root = write_demo_corpus(tmp / f"corpus-{seconds:g}", n_systems=8,
                                     n_prompts=-(-n // 8), seconds=seconds, sample_rate=44100)
            for shape in shapes:
                for label, tree in trees.items():
                    key = f"{shape} {seconds:g} s"
                    got = run_child(tree, root, SHAPES[shape], workers, tok, tmp)
                    out.setdefault(label, {})[key] = got
                    print(f"{label:<7}{key:<16} host {got['host_ms_per_clip']:.3f} ms/clip, "
                          f"null pipeline {got['null_pipeline_clips_per_s']:.1f} clips/s, "
                          f"decode only {got['decode_only_clips_per_s']:.1f} clips/s",
                          flush=True)
    return out


def table(res: dict) -> str:
    """Markdown: the per-clip breakdown of each measurement, before and after side by side."""
    lines = []
    for key in res["after"]:
        cols = [t for t in ("before", "after") if t in res]
        lines += [f"\n{key} (ms per clip: CPU / wall)\n", "| phase | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        phases = []
        for t in cols:
            phases += [p for p in res[t][key]["phases_ms_per_clip"] if p not in phases]
        for p in phases:
            cells = []
            for t in cols:
                v = res[t][key]["phases_ms_per_clip"].get(p)
                cells.append("-" if v is None else f"{v['cpu']:.3f} / {v['wall']:.3f}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        for name, fig in (("host CPU ms per clip, outside the forward (no clock)",
                           "host_ms_per_clip"),
                          ("null pipeline clips/s", "null_pipeline_clips_per_s"),
                          ("decode only clips/s", "decode_only_clips_per_s")):
            lines.append(f"| **{name}** | " + " | ".join(
                f"{res[t][key][fig]:.3f}" for t in cols) + " |")
        ratio = [res[t][key]["null_pipeline_clips_per_s"] / res[t][key]["decode_only_clips_per_s"]
                 for t in cols]
        lines.append("| **null pipeline / decode only** | "
                     + " | ".join(f"{r:.2f}" for r in ratio) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        root, backbone, workers, tok, out = sys.argv[2:7]
        return child(root, backbone, int(workers), tok, out)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="also measure the package at this git revision")
    ap.add_argument("--clips", type=int, default=256, help="10 s clips (30 s: half as many)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    res = measure(args.clips, args.before, args.workers)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
