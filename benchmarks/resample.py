"""What the publishers' resamplers cost against soxr HQ (issue 19 A2): seconds to resample
one mono clip to 16 kHz (Audiobox-Aesthetics: torchaudio; the others: soxr), median of
repeats, in this process at the thread count given (decoding workers run one each).

    OMP_NUM_THREADS=1 python benchmarks/resample.py [--threads 1] [--repeats 7]"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from qamro_pipe.extract.audio import resample


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: torchaudio builds and caches nothing, but the first call pays imports
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"torch threads {torch.get_num_threads()}; median of {args.repeats}")
    print("| clip | to | soxr HQ, ms | torchaudio, ms | torchaudio / soxr |")
    print("|---|---|---|---|---|")
    for sr, seconds in ((44100, 10), (48000, 10), (44100, 180), (22050, 10)):
        x = (0.1 * rng.standard_normal(sr * seconds)).astype(np.float32)
        for out in (16000,):
            a = median_seconds(lambda: resample(x, sr, out, "soxr"), args.repeats)
            b = median_seconds(lambda: resample(x, sr, out, "torchaudio"), args.repeats)
            print(f"| {seconds} s at {sr / 1000:g} kHz | {out / 1000:g} kHz | {a * 1e3:.1f} "
                  f"| {b * 1e3:.1f} | {b / a:.1f}x |")


if __name__ == "__main__":
    main()
