"""Where the process that feeds the model spends its time during an extraction (cProfile of
that process; the decoding workers are other processes). On the H200 every backbone ended at
215-290 clips/s end to end while its forward alone ran 300-930 clips/s: this finds the host
work that caps it.

    python benchmarks/profile_extract.py --device cuda [--backbone clap-music] [--prompts 40]
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench import corpus  # noqa: E402

from qamro_pipe.config import ExtractConfig  # noqa: E402
from qamro_pipe.extract.datasets import load_dataset  # noqa: E402
from qamro_pipe.extract.loop import extract  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backbone", default="clap-music")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=40)  # 8 systems x prompts clips of 10 s
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = corpus(tmp, args.prompts, 10.0, "corpus", sr=44100)
        tok = None
        if args.backbone == "clap-music":
            from kit.backbones import write_roberta_style_tokenizer
            tok = str(write_roberta_style_tokenizer(tmp / "tokenizer"))
        recs = load_dataset("musiceval", root)
        cfg = ExtractConfig(backbone=args.backbone, checkpoint="random", tokenizer_dir=tok,
                            device=args.device, precision=args.precision,
                            batch_size=args.batch, workers=args.workers)
        warm = dataclasses.replace(recs, clips=recs.clips[:2 * args.batch])
        extract(warm, cfg, tmp / "warm.h5", progress=False)  # lazy set-up, not profiled
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        s = extract(recs, cfg, tmp / "c.h5", progress=False)
        prof.disable()
        wall = time.perf_counter() - t
        print(f"{args.backbone} {args.precision} b{args.batch} on {args.device}: "
              f"{s.written} clips, {s.written / s.seconds:.1f} clips/s after load "
              f"(load {s.load_seconds:.1f} s, wall {wall:.1f} s)")
        for key in ("tottime", "cumtime"):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
            print(f"--- by {key} ---")
            print("\n".join(out.getvalue().splitlines()[6:]))


if __name__ == "__main__":
    main()
