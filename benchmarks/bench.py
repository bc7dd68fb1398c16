"""`make bench`: speed and memory figures, each a ratio measured in this one run.

  loss        vectorised QAMRO vs the published pair-by-pair loop, B=256, forward+backward
  train       epochs/s at MusicEval size (2,748 clips, 512-d audio + 512-d text, both heads)
              for K=1, 9, 27 batched members; K=27 against 27 separate K=1 runs
  gflops      achieved training GFLOP/s against a plain matmul of the same shapes
  sweep       (GPU) the issue-6 sweep: 27 members, 1000 epochs, data load included;
              (CPU) 18 members x 30 epochs fp32, cores busy; --full-sweep: the whole
              paper-recipe sweep with members leaving as they stop vs all stepping
  extract     end-to-end clips/s (decode, resample, model, HDF5) against the forward alone
  pipeline    extract's own loop against a simulated asynchronous device
  memory      extraction peak RSS at two dataset sizes; training memory against features+K*params
  host-ceiling  the process that feeds the model, with a model that costs nothing
              (host_ceiling.py): its CPU per clip outside the forward, its clips/s against
              the decoding workers' own, CLAP- and Aesthetics-shaped, 10 s and 30 s clips

Figures print as a table and go to bench-results/bench-<device>.json (or --json FILE).
`--only host-ceiling --json FILE` runs that section alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qamro_pipe.config import LossConfig, Member, TrainConfig  # noqa: E402
from qamro_pipe.store import read_cache, write_cache  # noqa: E402
from qamro_pipe.train.heads import HeadSpec  # noqa: E402
from qamro_pipe.train.losses import qamro_loss  # noqa: E402
from qamro_pipe.train.losses_reference import qamro_loss_literal  # noqa: E402
from qamro_pipe.train.trainer import resolve_device, train  # noqa: E402

HEADS = (HeadSpec("overall", "overall", ("audio",)),
         HeadSpec("textual", "textual", ("audio", "text")))
RESULTS: dict = {}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync(device)
    return (time.perf_counter() - t) / repeat, out


def report(section, name, value, unit=""):
    RESULTS.setdefault(section, {})[name] = value
    shown = f"{value:,.4g}" if isinstance(value, float) else str(value)
    print(f"  {section:<8} {name:<52} {shown} {unit}", flush=True)


# -- loss ---------------------------------------------------------------------------------
def bench_loss(device):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(256, generator=g).to(device)
    target = (torch.randint(5, 26, (256,), generator=g) / 5).to(device)

    def step(fn):
        p = pred.clone().requires_grad_()
        fn(p, target).backward()
        return p.grad

    step(qamro_loss)
    fast, g1 = timed(lambda: step(qamro_loss), device, repeat=50)
    slow, g2 = timed(lambda: step(qamro_loss_literal), device)
    assert torch.allclose(g1, g2, atol=1e-5), "vectorised and literal gradients differ"
    report("loss", "literal pair loop, one step (s)", slow, "s")
    report("loss", "vectorised, one step (ms)", fast * 1e3, "ms")
    report("loss", "speed-up (literal / vectorised)", slow / fast, "x")


# -- training -----------------------------------------------------------------------------
def musiceval_sized_cache(path: Path, n=2748, n_systems=31, seed=0):
    rng = np.random.default_rng(seed)
    systems = rng.integers(0, n_systems, n)
    quality = np.linspace(1.5, 4.5, n_systems)[systems]
    audio = rng.normal(size=(n, 512)).astype(np.float32) * 0.05
    text = rng.normal(size=(n, 512)).astype(np.float32) * 0.05
    audio[:, :8] += (quality - 3)[:, None] * 0.1
    labels = np.stack([quality, quality * 0.9 + 0.3], 1) + rng.normal(0, 0.4, (n, 2))
    labels = np.clip(np.round(labels * 5) / 5, 1, 5).astype(np.float32)
    splits = np.where(np.arange(n) < 2473, "train", "dev")  # MusicEval: 2,473 train, 275 dev
    write_cache(path, ids=[f"c{i}" for i in range(n)], systems=[f"S{s:03d}" for s in systems],
                splits=splits, labels=labels, label_names=["overall", "textual"],
                features={"audio": audio, "text": text}, backbone="bench@1",
                dataset="musiceval")
    return path


def windowed_cache(path: Path, n=2748, n_systems=31, seed=0):
    """A MusicEval-sized cache as `extract --keep-windows` writes CLAP's: each clip's pooled
    512-d row and its 1-3 window rows (10-30 s clips)."""
    rng = np.random.default_rng(seed)
    systems = rng.integers(0, n_systems, n)
    quality = np.linspace(1.5, 4.5, n_systems)[systems]
    counts = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    win = rng.normal(size=(offsets[-1], 512)).astype(np.float32) * 0.05
    win[:, :8] += np.repeat(quality - 3, counts)[:, None] * 0.1
    weight = np.full(offsets[-1], 480000.0, np.float32)
    clip_of = np.repeat(np.arange(n), counts)
    pooled = np.stack([np.bincount(clip_of, weights=win[:, d]) for d in range(512)], 1) \
        / counts[:, None]
    labels = np.clip(np.round((quality + rng.normal(0, 0.4, n)) * 5) / 5, 1, 5)[:, None]
    write_cache(path, ids=[f"c{i}" for i in range(n)], systems=[f"S{s:03d}" for s in systems],
                splits=np.where(np.arange(n) < 2473, "train", "dev"),
                labels=labels.astype(np.float32), label_names=["overall"],
                features={"audio": pooled.astype(np.float32)}, backbone="bench@1",
                dataset="musiceval", windows={"audio": win}, window_offsets=offsets,
                window_weight=weight)
    return path


def bench_pool(device, path, epochs):
    """--pool attention against mean on CLAP-like kept windows: 9 members each, the same
    epochs; the mean members read the pooled rows (clip units), the attention members every
    window of their clips."""
    cache = read_cache(path)
    heads = (HeadSpec("overall", "overall", ("audio",)),)
    cfg = TrainConfig(max_epochs=epochs, patience=epochs + 1, bootstrap=0, device=str(device))
    times = {}
    for pool in ("mean", "attention"):
        members = [Member(LossConfig(pool=pool), s) for s in range(9)]
        train(cache, heads, members, replace(cfg, max_epochs=2))  # warm
        times[pool], _ = timed(lambda: train(cache, heads, members, cfg), device)
        report("pool", f"{pool}: K=9 epochs/s ({epochs} epochs)", epochs / times[pool])
    report("pool", "attention / mean time per epoch", times["attention"] / times["mean"])


def train_flops(cache, split, k):
    """Matmul FLOPs of one epoch: per train row the forward, the weight gradients and the
    input gradients of every layer but the first (the features need none); per validation row
    the forward. Elementwise work (the pair loss) is not counted."""
    def macs(dims):
        return [a * b for a, b in zip(dims[:-1], dims[1:])]
    per_train = per_val = 0
    for d in (512, 1024):  # the two MusicEval heads
        m = macs([d, 256, 64, 1])
        per_train += 2 * (sum(m) + sum(m) + sum(m[1:]))
        per_val += 2 * sum(m)
    return k * (per_train * len(split.train) + per_val * len(split.val))


def bench_train(device, path, epochs, graph=True):
    cache = read_cache(path)
    base = TrainConfig(max_epochs=epochs, patience=epochs + 1, bootstrap=0, device=str(device),
                       cuda_graph=graph)
    times = {}
    for k in (1, 9, 27):
        members = [Member(LossConfig(beta=float(1 + i % 9)), i // 9) for i in range(k)]
        train(cache, HEADS, members, TrainConfig(max_epochs=2, device=str(device)))  # warm
        sec, res = timed(lambda: train(cache, HEADS, members, base), device)
        times[k] = sec
        report("train", f"K={k:<2} epochs/s ({epochs} epochs)", epochs / sec)
        if k == 27:
            flops = train_flops(cache, res.split, k) * epochs
            report("gflops", "training GFLOP/s (K=27)", flops / sec / 1e9)
            report("gflops", "plain matmul GFLOP/s, same shapes", matmul_gflops(device, k))
            report("gflops", "training / matmul",
                   RESULTS["gflops"]["training GFLOP/s (K=27)"]
                   / RESULTS["gflops"]["plain matmul GFLOP/s, same shapes"])
    report("train", "K=27 batched vs 27 separate runs (time ratio)", times[27] / (27 * times[1]))
    return times


def matmul_gflops(device, k, b=256, repeat=20):
    """The heads' own GEMMs (both heads, forward shapes, K members) without anything else."""
    shapes = [(b, d, k * 256) for d in (512, 1024)] + [(k, b, 256, 64)] * 2
    mats = []
    for s in shapes:
        if len(s) == 3:
            mats.append((torch.randn(s[0], s[1], device=device),
                         torch.randn(s[1], s[2], device=device)))
        else:
            mats.append((torch.randn(s[0], s[1], s[2], device=device),
                         torch.randn(s[0], s[2], s[3], device=device)))
    flops = sum(2 * a.numel() * bm.shape[-1] for a, bm in mats)

    def run():
        for a, bm in mats:
            torch.matmul(a, bm)
    run()
    sec, _ = timed(run, device, repeat)
    return flops / sec / 1e9


def max_prediction_diff(a, b) -> float:
    """Largest |difference| between two TrainResults' predictions, over heads and clips."""
    return max(float(np.abs(a.predictions[h] - b.predictions[h]).max()) for h in a.predictions)


def bench_sweep_gpu(device, path, epochs=1000, compare_epochs=100):
    """Issue 6 target: 27 members (beta 1..9 x 3 seeds), 1000 epochs, data load included."""
    members = [Member(LossConfig(alpha=0.2, beta=float(b)), s) for b in range(1, 10)
               for s in range(3)]
    cfg = TrainConfig(max_epochs=epochs, patience=10_000, bootstrap=0, device=str(device))

    def run():
        return train(read_cache(path), HEADS, members, cfg)
    sec, res = timed(run, device)
    assert res.epochs_run == epochs
    report("sweep", f"27 members x {epochs} epochs, fp32, wall incl. load (s)", sec, "s")
    report("sweep", "fp32 ms per epoch", sec / epochs * 1e3, "ms")
    tf32 = TrainConfig(max_epochs=epochs, patience=10_000, bootstrap=0, device=str(device),
                       matmul_precision="high")
    sec32, res32 = timed(lambda: train(read_cache(path), HEADS, members, tf32), device)
    report("sweep", f"27 members x {epochs} epochs, TF32, wall incl. load (s)", sec32, "s")
    report("sweep", "TF32 ms per epoch", sec32 / epochs * 1e3, "ms")
    report("sweep", "max |fp32 - TF32| prediction",
           max_prediction_diff(res, res32))
    import qamro_pipe.train.optim as tr

    fused_sgd = tr._sgd

    def foreach_sgd(params, grads, bufs, cfg):  # the update before the fused kernel: 3 passes
        with torch.no_grad():
            torch._foreach_mul_(bufs, cfg.momentum)
            torch._foreach_add_(bufs, list(grads))
            torch._foreach_add_(params, bufs, alpha=-cfg.lr)
    tr._sgd = foreach_sgd
    try:
        sec_fe, res_fe = timed(run, device)
    finally:
        tr._sgd = fused_sgd
    report("sweep", f"27 members x {epochs} epochs, fp32, three _foreach SGD passes (s)", sec_fe,
           "s")
    report("sweep", "fused SGD / three _foreach passes (time ratio)", sec / sec_fe)
    report("sweep", "max |fused - _foreach SGD| prediction",
           max_prediction_diff(res, res_fe))
    eager_cfg = TrainConfig(max_epochs=compare_epochs, patience=10_000, bootstrap=0,
                            device=str(device), cuda_graph=False)
    graph_cfg = TrainConfig(max_epochs=compare_epochs, patience=10_000, bootstrap=0,
                            device=str(device))
    cache = read_cache(path)
    t_eager, r_e = timed(lambda: train(cache, HEADS, members, eager_cfg), device)
    t_graph, r_g = timed(lambda: train(cache, HEADS, members, graph_cfg), device)
    report("sweep", f"eager ms/epoch ({compare_epochs} epochs)", t_eager / compare_epochs * 1e3,
           "ms")
    report("sweep", f"graph ms/epoch ({compare_epochs} epochs)", t_graph / compare_epochs * 1e3,
           "ms")
    report("sweep", "graph speed-up", t_eager / t_graph, "x")
    report("sweep", f"max |eager - graph| prediction after {compare_epochs} epochs",
           max_prediction_diff(r_e, r_g))
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        one = TrainConfig(max_epochs=1, patience=10_000, bootstrap=0, device=str(device),
                          cuda_graph=False)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            train(cache, HEADS, members, one)
        kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        report("sweep", "CUDA kernels in one eager epoch (incl. set-up)", kernels)
        report("memory", "training peak CUDA memory (MiB)",
               torch.cuda.max_memory_allocated() / 2**20, "MiB")


def cpu_busy(fn):
    """(seconds, result, CPU time / wall time): 2.0 means both of two cores were busy."""
    t, c = time.perf_counter(), os.times()
    out = fn()
    c2, wall = os.times(), time.perf_counter() - t
    return wall, out, (c2.user + c2.system - c.user - c.system) / wall


def bench_sweep_cpu(path, full: bool, epochs: int = 30):
    """Issue 13's CPU path: the 18-member beta sweep (beta 1..11 x 3 seeds) at MusicEval size,
    paper recipe. Always: `epochs` epochs in fp32, and how busy the cores are. With --full-sweep: the whole sweep to early stopping (up to 1000 epochs),
    members leaving the batch as they stop (compact) against all stepping to the end."""
    cache = read_cache(path)
    members = [Member(LossConfig(alpha=0.2, beta=float(b)), s) for b in (1, 3, 5, 7, 9, 11)
               for s in range(3)]
    base = TrainConfig(bootstrap=0, device="cpu")
    res = {}
    cfg = replace(base, max_epochs=epochs, patience=10_000)
    sec, res["highest"], busy = cpu_busy(lambda: train(cache, HEADS, members, cfg))
    report("sweepcpu", f"18 members x {epochs} epochs, fp32 (s)", sec, "s")
    report("sweepcpu", "  CPU time / wall time (2 = both cores busy)", busy)
    if not full:
        return
    for compact in (True, False):
        cfg = replace(base, compact=compact)
        sec, r, busy = cpu_busy(lambda: train(cache, HEADS, members, cfg))
        what = "members leave as they stop" if compact else "every member steps to the end"
        report("sweepcpu", f"full sweep, paper recipe, {what}: seconds", sec, "s")
        report("sweepcpu", f"  epochs run / member-epochs computed ({what})",
               f"{r.epochs_run} / {r.member_epochs}")
        report("sweepcpu", f"  member-epochs per second ({what})", r.member_epochs / sec)
        report("sweepcpu", f"  CPU time / wall time ({what})", busy)
        res[compact] = r
    report("sweepcpu", "full sweep: stopped epochs (min, median, max)",
           str(np.percentile(res[True].stopped_epoch, [0, 50, 100]).tolist()))
    report("sweepcpu", "full sweep: max |compact - not| prediction",
           max_prediction_diff(res[True], res[False]))


def ops_per_epoch(path, k=27):
    """Tensor operations (aten ops that are not views) in one training epoch at MusicEval size,
    counted on any device: on a GPU each is about one kernel launch, the cost that dominates
    there. Epoch 3 minus epoch 1, halved, leaves set-up out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += not func.is_view
            return func(*args, **(kwargs or {}))

    cache = read_cache(path)
    members = [Member(LossConfig(alpha=0.2, beta=float(1 + i % 9)), i // 9) for i in range(k)]
    counts = []
    for epochs in (1, 3):
        Count.n = 0
        with Count():
            train(cache, HEADS, members, TrainConfig(max_epochs=epochs, patience=10_000,
                                                     bootstrap=0, device="cpu"))
        counts.append(Count.n)
    report("train", f"tensor ops per epoch, K={k} (device-independent)",
           (counts[1] - counts[0]) / 2)


def training_memory(path, k=27):
    cache = read_cache(path)
    feats = sum(v.nbytes for v in cache.features.values())
    params = sum(4 * (d * 256 + 256 + 256 * 64 + 64 + 64 + 1) for d in (512, 1024))
    report("memory", "features (MiB)", feats / 2**20, "MiB")
    report("memory", f"K={k} x head parameters x 4 (param,grad,momentum,best) (MiB)",
           4 * k * params / 2**20, "MiB")


# -- extraction ---------------------------------------------------------------------------
EXTRACT_CHILD = r"""
import dataclasses, json, resource, sys
from qamro_pipe.config import ExtractConfig
from qamro_pipe.extract.datasets import load_dataset
from qamro_pipe.extract.loop import extract
root, out, backbone, ckpt, tok, device, precision, batch, workers, warm = sys.argv[1:11]
recs = load_dataset("musiceval", root)
cfg = ExtractConfig(backbone=backbone, checkpoint=None if ckpt == "-" else ckpt,
                    tokenizer_dir=None if tok == "-" else tok, device=device,
                    precision=precision, batch_size=int(batch), workers=int(workers))
if warm == "warm":  # two batches first, in this process: lazy CUDA set-up is not timed below
    extract(dataclasses.replace(recs, clips=recs.clips[:2 * int(batch)]), cfg, out + ".warm",
            progress=False)
s = extract(recs, cfg, out, progress=False)
# s.seconds: decoding, model and writing once the model is loaded (load_seconds apart)
print(json.dumps({"clips": s.written, "sec": s.seconds, "load_sec": s.load_seconds,
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def corpus(tmp: Path, n_prompts: int, seconds: float, name: str, sr=16000):
    from qamro_pipe.extract.datasets.demo import write_demo_corpus
    return write_demo_corpus(tmp / name, n_systems=8, n_prompts=n_prompts, seconds=seconds,
                             sample_rate=sr)


def run_extract_child(root, out, backbone, ckpt="-", tok="-", device="cpu", precision="fp32",
                      batch=16, workers=2, warm=False):
    p = subprocess.run([sys.executable, "-c", EXTRACT_CHILD, str(root), str(out), backbone,
                        ckpt, tok, device, precision, str(batch), str(workers),
                        "warm" if warm else "cold"],
                       capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def forward_only(backbone, root, device, precision, batch, tok=None, n=None):
    """The backbone alone on decoded audio held in memory, one batch at a time: -> (clips/s
    with the model's input already on the device, clips/s including preparing that input on
    the host and uploading it). Text embeddings are in both (extraction computes them too)."""
    from qamro_pipe.extract import audio
    from qamro_pipe.extract.backbones import get_backbone
    from qamro_pipe.extract.datasets import load_dataset

    bb = get_backbone(backbone, checkpoint="random" if backbone != "melstats" else None,
                      device=device, precision=precision, tokenizer_dir=tok, offline=True)
    recs = load_dataset("musiceval", root).clips[:n]
    wins = [w for c in recs for w in audio.windows(audio.load_audio(c.path, bb.sample_rate),
                                                   bb.window_samples)]
    batches = [wins[i:i + batch] for i in range(0, len(wins), batch)]
    texts = [c.text for c in recs]
    bb.embed_windows(batches[0])  # load + warm
    dev = torch.device(device)

    def embed_texts():
        if bb.uses_text:
            for i in range(0, len(texts), batch):
                bb.embed_texts(texts[i:i + batch])

    def with_preparation():
        for b in batches:
            bb.embed_windows(b)
        embed_texts()

    prepared = [bb.prepare_windows(b) for b in batches]  # held on the device

    def model_only():
        for x in prepared:
            bb.forward_prepared(x).result()
        embed_texts()
    sec_model, _ = timed(model_only, dev)
    prepared.clear()  # frees the device copies before the other timing
    sec_prep, _ = timed(with_preparation, dev)
    return len(recs) / sec_model, len(recs) / sec_prep


def bench_decoding(root: Path, sample_rate=48000, window_seconds=10.0):
    """The decoding pipeline alone (workers decode and resample; the consumer takes each
    clip's windows and lets go): clips/s, and the consumer process's CPU per clip, which
    bounds extraction on a machine with cores to spare. Clips through shared memory vs
    pickled through the pool's pipe, same run."""
    from qamro_pipe.extract.datasets import load_dataset
    from qamro_pipe.extract.decoding import Decoder

    clips = load_dataset("musiceval", root).clips
    tasks = [(i, str(c.path), sample_rate, c.start, c.end) for i, c in enumerate(clips)]
    workers = min(8, os.cpu_count())
    for share in (True, False, True, False):
        dec = Decoder(tasks, workers, int(sample_rate * window_seconds), ahead=4 * workers,
                       held=16, share=share)
        first = next(dec)  # workers forked and busy: start timing from the first clip
        t, cpu = time.perf_counter(), time.process_time()
        n = 0
        for row, wins, err in dec:
            assert err is None and sum(len(w) for w in wins) > 0
            dec.release([row])
            n += 1
        sec, cpu = time.perf_counter() - t, time.process_time() - cpu
        dec.close()
        dec.release([first[0]])
        how = "shared memory" if share else "pickled"
        report("decode", f"{workers} workers, {how}: clips/s ({n} clips of 10 s)", n / sec)
        report("decode", f"{workers} workers, {how}: consumer CPU ms per clip",
               cpu / n * 1e3, "ms")


def bench_pipelining(tmp: Path, prep=0.025, forward=0.040):
    """extract()'s own loop against a simulated device, to show on any machine that the
    host's work per batch hides behind the device's: preparing a batch occupies the host for
    `prep` s, the forward then runs for `forward` s on a one-thread executor (a GPU stream:
    batches in order) while the host goes on. A loop that waited for each forward would take
    prep + forward per batch. Defaults: CLAP bf16 on an H100 at batch 64 (~37 ms) and a
    guess of the host's copy into pinned memory."""
    from concurrent.futures import ThreadPoolExecutor

    from qamro_pipe.config import ExtractConfig
    from qamro_pipe.extract.backbones.base import Backbone, FeatureSpec, register_backbone
    from qamro_pipe.extract.datasets import load_dataset
    from qamro_pipe.extract.loop import extract

    stream = ThreadPoolExecutor(1)

    @register_backbone
    class SimulatedDevice(Backbone):
        name, version, sample_rate, window_seconds = "simulated-device", 1, 16000, 1.0

        def feature_specs(self):
            return {"audio": FeatureSpec((8,))}

        def _load(self):
            pass

        def prepare_windows(self, windows):
            time.sleep(prep)  # the host copies the batch into the model's input
            return len(windows)

        def forward_prepared(self, n):
            return stream.submit(lambda: time.sleep(forward) or {
                "audio": np.ones((n, 8), np.float32)})

        def embed_windows_async(self, windows):
            return self.forward_prepared(self.prepare_windows(windows))

    import qamro_pipe.extract.batches as ex

    launch = ex.launch

    def waiting_launch(*a, **k):  # the loop before: each batch's forward waited for
        job = launch(*a, **k)
        for part in job.parts:
            part.result()
        return job

    root = corpus(tmp, 40, 1.0, "pipelining", sr=16000)
    recs = load_dataset("musiceval", root)
    per_batch = {}
    for how, fn in (("pipelined", launch), ("one batch at a time", waiting_launch)):
        ex.launch = fn
        try:
            s = extract(recs, ExtractConfig(backbone="simulated-device", device="cpu",
                                            batch_size=16, workers=2),
                        tmp / f"pipelining-{len(per_batch)}.h5", progress=False)
        finally:
            ex.launch = launch
        batches = -(-s.written // 16)
        per_batch[how] = s.seconds / batches
        report("pipeline", f"simulated device (host {prep * 1e3:.0f} ms + forward "
               f"{forward * 1e3:.0f} ms per batch), {how}: ms per batch", per_batch[how] * 1e3,
               "ms")
        report("pipeline", f"simulated device, {how}: forward alone / end to end",
               forward / per_batch[how])
    stream.shutdown()


def bench_extract(device, tmp: Path, tok: str | None, full: bool):
    dev = str(device)
    plan = [("melstats", "fp32", 16, 48, 10.0)]
    clap_prompts = 40 if full else 2  # 8 systems x prompts clips of 10 s
    plan.append(("clap-music", "fp32", 64 if full else 8, clap_prompts, 10.0))
    if full:
        plan += [("clap-music", "bf16", 64, clap_prompts, 10.0),
                 ("aesthetics", "fp32", 64, clap_prompts, 10.0),
                 ("aesthetics", "bf16", 64, clap_prompts, 10.0)]
    bench_pipelining(tmp)
    roots = {}
    for backbone, precision, batch, n_prompts, secs in plan:
        key = (n_prompts, secs)
        if key not in roots:
            roots[key] = corpus(tmp, n_prompts, secs, f"corpus-{n_prompts}-{secs}", sr=44100)
        root = roots[key]
        if backbone == "melstats":
            bench_decoding(root)
        ckpt = "-" if backbone == "melstats" else "random"
        t = tok if backbone == "clap-music" else None
        fwd, fwd_prep = forward_only(backbone, root, dev, precision, batch, t)
        e2e = run_extract_child(root, tmp / f"{backbone}-{precision}.h5", backbone, ckpt,
                                t or "-", dev, precision, batch, workers=min(8, os.cpu_count()),
                                warm=True)  # the forward alone is timed warm too
        name = f"{backbone} {precision} b{batch}"
        rate = e2e["clips"] / e2e["sec"]
        report("extract", f"{name}: forward alone, input already on the device, clips/s", fwd)
        report("extract", f"{name}: forward with the input prepared on the host, clips/s",
               fwd_prep)
        report("extract", f"{name}: end to end clips/s ({e2e['clips']} clips)", rate)
        report("extract", f"{name}: end to end / forward alone (target >= 0.8)", rate / fwd)
        report("extract", f"{name}: end to end / forward with host preparation",
               rate / fwd_prep)
        report("extract", f"{name}: model load, not counted above (s)", e2e["load_sec"], "s")
    small = corpus(tmp, 6, 10.0, "mem-small", sr=44100)
    large = corpus(tmp, 24, 10.0, "mem-large", sr=44100)
    a = run_extract_child(small, tmp / "mem-a.h5", "melstats", workers=2)
    b = run_extract_child(large, tmp / "mem-b.h5", "melstats", workers=2)
    report("memory", f"extract peak RSS, {a['clips']} clips (MiB)", a["maxrss_mib"], "MiB")
    report("memory", f"extract peak RSS, {b['clips']} clips (MiB)", b["maxrss_mib"], "MiB")
    report("memory", "peak RSS ratio (4x the clips)", b["maxrss_mib"] / a["maxrss_mib"])


def bench_host_ceiling(clips: int) -> None:
    """host_ceiling.py's figures in this run's table; the headline keys (host_ms_per_clip,
    null_pipeline_clips_per_s, decode_only_clips_per_s) are CLAP-shaped 10 s clips'."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import host_ceiling

    res = host_ceiling.measure(clips)
    section = RESULTS.setdefault("host-ceiling", {})
    for key, fig in res["after"].items():
        section[key] = fig
    head = res["after"]["clap 10 s"]
    for name in ("host_ms_per_clip", "null_pipeline_clips_per_s", "decode_only_clips_per_s"):
        section[name] = head[name]
    section["workers"], section["batch"] = res["workers"], res["batch"]
    for key, fig in res["after"].items():
        report("host", f"{key}: feeding process CPU per clip, outside the forward (ms)",
               fig["host_ms_per_clip"], "ms")
        report("host", f"{key}: null pipeline / decoders alone ({res['workers']} workers)",
               fig["null_pipeline_clips_per_s"] / fig["decode_only_clips_per_s"])
    print(host_ceiling.table(res))


SECTIONS = ("loss", "train", "sweep", "pool", "extract", "host-ceiling")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=None, help="default: 20 on CPU, 300 on GPU")
    ap.add_argument("--full-extract", action="store_true", help="larger extraction benchmark")
    ap.add_argument("--full-sweep", action="store_true",
                    help="CPU: the whole 18-member beta sweep to early stopping, twice (~30 min)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip")
    ap.add_argument("--only", default="",
                    help=f"comma list of sections to run ({', '.join(SECTIONS)})")
    ap.add_argument("--host-clips", type=int, default=256,
                    help="host-ceiling: 10 s clips per measurement (30 s: half as many)")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--json", help="write the figures here (default: OUT/bench-DEVICE.json)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    skip = set(args.skip.split(","))
    if args.only:
        unknown = set(args.only.split(",")) - set(SECTIONS)
        if unknown:
            ap.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}")
        skip = set(SECTIONS) - set(args.only.split(","))
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, cpus {os.cpu_count()}")
    RESULTS["device"] = {"type": device.type, "name": name, "torch": torch.__version__,
                         "cpus": os.cpu_count()}
    epochs = args.epochs or (300 if device.type == "cuda" else 20)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "loss" not in skip:
            bench_loss(device)
        path = musiceval_sized_cache(tmp / "musiceval-sized.h5")
        if "train" not in skip:
            bench_train(device, path, epochs)
            ops_per_epoch(path)
            training_memory(path)
        if device.type == "cuda" and "sweep" not in skip:
            bench_sweep_gpu(device, path)
        if device.type == "cpu" and "sweep" not in skip:
            bench_sweep_cpu(path, args.full_sweep)
        if "pool" not in skip:
            bench_pool(device, windowed_cache(tmp / "windowed.h5"), epochs)
        if "extract" not in skip:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from kit.backbones import write_roberta_style_tokenizer
            tok = str(write_roberta_style_tokenizer(tmp / "tokenizer"))
            bench_extract(device, tmp, tok, args.full_extract or device.type == "cuda")
        if "host-ceiling" not in skip:
            bench_host_ceiling(args.host_clips)
    out = Path(args.json) if args.json else Path(args.out) / f"bench-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
