"""The pair hinge of `losses._PairHinge` as one Triton kernel per call (opt-in, CUDA).

The torch version makes about nine passes over [K, B, B] tensors and a dozen small kernels per
call; on a GPU, where an epoch is a few hundred small kernels, that is launch and memory
traffic. Here one program per member walks its B x B pairs in row blocks held in registers
and writes the loss, the row counts of active hinges and the q-weighted column counts; the
gradient is then two small torch ops. No atomics: the same inputs give the same bits, which
CUDA-graph replay and "same seed, same numbers" rely on.

TrainConfig.pair_kernel="triton" selects it. The tests run it on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, a subprocess) against the torch version; on a GPU,
tests/test_gpu.py compares the two and benchmarks/bench.py times both.
"""
from __future__ import annotations

import os

import torch

from ..errors import QamroError

_KERNEL = None


def available(device: torch.device) -> str | None:
    """None if the Triton pair kernel can run on `device`, else why not."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return "pair_kernel='triton' needs a CUDA device (or TRITON_INTERPRET=1, for tests)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "pair_kernel='triton' needs the triton package (it comes with CUDA builds of torch)"
    return None


def _kernel():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def pair_hinge_kernel(pred, y, yn, q, alpha, margin, loss, row_act, col_w, b,
                          stride, BLOCK_B: tl.constexpr, BLOCK_I: tl.constexpr,
                          NEED_GRAD: tl.constexpr):
        k = tl.program_id(0)
        base = k * stride
        offs_j = tl.arange(0, BLOCK_B)
        mj = offs_j < b
        al = tl.load(alpha + k)
        mg = tl.load(margin + k)
        u_j = al * tl.load(y + base + offs_j, mask=mj, other=0.0) \
            - tl.load(pred + base + offs_j, mask=mj, other=0.0)
        yn_j = tl.load(yn + base + offs_j, mask=mj, other=float("nan"))
        col = tl.zeros([BLOCK_B], dtype=tl.float32)
        total = tl.zeros([BLOCK_I], dtype=tl.float32)
        for i0 in range(0, BLOCK_B, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mi = offs_i < b
            a_i = al * tl.load(y + base + offs_i, mask=mi, other=0.0) \
                - tl.load(pred + base + offs_i, mask=mi, other=0.0) + mg
            yn_i = tl.load(yn + base + offs_i, mask=mi, other=float("nan"))
            q_i = tl.load(q + base + offs_i, mask=mi, other=0.0)
            above = yn_i[:, None] > yn_j[None, :]  # NaN (unknown, padding) compares False
            arg = a_i[:, None] - u_j[None, :]
            hinge = tl.where(above, tl.maximum(arg, 0.0, propagate_nan=tl.PropagateNan.ALL),
                             0.0)
            total += q_i * tl.sum(hinge, axis=1)
            if NEED_GRAD:
                act = tl.where(hinge > 0, 1.0, 0.0)
                tl.store(row_act + base + offs_i, tl.sum(act, axis=1), mask=mi)
                col += tl.sum(q_i[:, None] * act, axis=0)
        tl.store(loss + k, tl.sum(total, axis=0))
        if NEED_GRAD:
            tl.store(col_w + base + offs_j, col, mask=mj)

    _KERNEL = (triton, pair_hinge_kernel)
    return _KERNEL


class PairHingeTriton(torch.autograd.Function):
    """Same inputs, outputs and gradient as losses._PairHinge."""

    @staticmethod
    def forward(ctx, pred, y, yn, q, alpha, margin):
        triton, kernel = _kernel()
        k, b = pred.shape
        if pred.dtype != torch.float32:
            raise QamroError("pair_kernel='triton' computes in float32 only")
        pred, y, yn, q = (t.contiguous() for t in (pred, y, yn, q))
        alpha, margin = (t.reshape(k).contiguous() for t in (alpha, margin))
        need = bool(ctx.needs_input_grad[0])
        loss = torch.empty(k, dtype=pred.dtype, device=pred.device)
        row_act = torch.empty_like(pred) if need else loss
        col_w = torch.empty_like(pred) if need else loss
        block_b = max(16, triton.next_power_of_2(b))
        kernel[(k,)](pred, y, yn, q, alpha, margin, loss, row_act, col_w, b,
                     pred.stride(0), BLOCK_B=block_b, BLOCK_I=min(32, block_b),
                     NEED_GRAD=need)
        if need:
            ctx.save_for_backward(col_w - q * row_act)
        return loss

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return grad[:, None] * g, None, None, None, None, None
