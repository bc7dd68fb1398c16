"""The opt-in Triton pair kernel (fused.py) against the torch one, on the CPU through
Triton's interpreter. It runs in a subprocess: TRITON_INTERPRET must be set before Triton
compiles anything, and must not leak into the other tests."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qamro_pipe.config import TrainConfig
from qamro_pipe.errors import QamroError

pytest.importorskip("triton")

CHILD = r"""
import sys
import numpy as np
import torch
sys.path.insert(0, sys.argv[2])
from kit.caches import make_synthetic_cache
from qamro_pipe.config import LossConfig, Member, TrainConfig
from qamro_pipe.train.heads import HeadSpec
from qamro_pipe.train.losses import label_terms, pair_hinge
from qamro_pipe.store.reader import read_cache
from qamro_pipe.train.trainer import train

g = torch.Generator().manual_seed(0)
for k, b in ((5, 24), (3, 256), (4, 178), (2, 7), (2, 300)):
    y = (torch.randint(5, 26, (k, b), generator=g) / 5).float()
    y[0, :3] = float("nan")  # unknown labels
    y[-1] = 3.0  # all tied: no pair, loss 0
    t = label_terms(y, beta=torch.rand(k, generator=g) * 8 + 1)
    alpha, margin = torch.rand(k, generator=g), torch.rand(k, generator=g) * 0.1
    p0 = torch.randn(k, b, generator=g)
    got = {}
    for kernel in ("torch", "triton"):
        p = p0.clone().requires_grad_()
        loss = pair_hinge(p, t, alpha, margin, kernel)
        (loss * torch.arange(1, k + 1)).sum().backward()
        got[kernel] = loss.detach(), p.grad
    (lt, gt), (lf, gf) = got["torch"], got["triton"]
    assert torch.allclose(lt, lf, rtol=1e-5, atol=1e-6), (k, b, lt, lf)
    assert torch.allclose(gt, gf, rtol=1e-5, atol=1e-7), (k, b)
    assert lf[-1] == 0 and (gf[-1] == 0).all()
    with torch.no_grad():
        assert torch.allclose(pair_hinge(p0, t, alpha, margin, "triton"), lt, rtol=1e-5)
    p0[0, -1] = float("nan")  # a diverged member's loss stays NaN, as with torch
    nan = pair_hinge(p0, t, alpha, margin, "triton")
    assert torch.isnan(nan[0]) and torch.isfinite(nan[1:]).all()

cache = read_cache(make_synthetic_cache(sys.argv[1]))
heads = (HeadSpec("overall", "overall", ("audio",)),
         HeadSpec("textual", "textual", ("audio", "text")))
members = [Member(LossConfig(beta=b), s) for b, s in ((1.0, 0), (7.0, 1))]
runs = [train(cache, heads, members, TrainConfig(max_epochs=6, bootstrap=0, device="cpu",
                                                 batch_size=64, pair_kernel=kernel))
        for kernel in ("torch", "triton")]
for h in ("overall", "textual"):
    np.testing.assert_allclose(runs[0].predictions[h], runs[1].predictions[h], rtol=1e-4,
                               atol=1e-5)
print("ok")
"""


def test_triton_pair_kernel_equals_the_torch_one(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    tests = Path(__file__).parents[1]
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "c.h5"), str(tests)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_triton_pair_kernel_needs_cuda_outside_the_interpreter(synthetic_cache, monkeypatch):
    from qamro_pipe.config import LossConfig, Member
    from qamro_pipe.store.reader import read_cache
    from qamro_pipe.train.heads import HeadSpec
    from qamro_pipe.train.trainer import train

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(QamroError, match="needs a CUDA device"):
        train(read_cache(synthetic_cache), (HeadSpec("overall", "overall", ("audio",)),),
              [Member(LossConfig(), 0)], TrainConfig(device="cpu", pair_kernel="triton"))
    with pytest.raises(QamroError, match="unknown pair_kernel"):
        TrainConfig(pair_kernel="cuda")
