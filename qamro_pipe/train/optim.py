"""The optimisers, as in-place updates of every member's parameters at once: SGD with
momentum (torch's rule) and AdamW (torch's own functional form), with the buffers they keep
(what TrainState saves and a resume restores)."""
from __future__ import annotations

import torch
from torch.optim.adamw import adamw

from ..config import TrainConfig


def optimizer_buffers(cfg: TrainConfig) -> tuple[str, ...]:
    """The per-parameter buffers the optimiser keeps (what TrainState saves)."""
    return ("momentum",) if cfg.optimizer == "sgd" else ("exp_avg", "exp_avg_sq")


def make_optimizer(cfg: TrainConfig, params, buffers: dict[str, list[torch.Tensor]],
                   steps: int, device: torch.device):
    """grads -> None, updating params and buffers in place: SGD with momentum, or AdamW as
    torch.optim.AdamW computes it (its own functional form, foreach; capturable on a GPU, so
    the step count lives on the device and a CUDA graph replays it)."""
    if cfg.optimizer == "sgd":
        return lambda grads: _sgd(params, grads, buffers["momentum"], cfg)

    cuda = device.type == "cuda"
    counts = [torch.tensor(float(steps), device=device if cuda else "cpu") for _ in params]
    beta1, beta2 = cfg.adam_betas

    def step(grads):
        with torch.no_grad():
            adamw(params, list(grads), buffers["exp_avg"], buffers["exp_avg_sq"], [], counts,
                  foreach=True, capturable=cuda, amsgrad=False, beta1=beta1, beta2=beta2,
                  lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps, maximize=False)
    return step


def _sgd(params, grads, bufs, cfg: TrainConfig) -> None:
    """SGD with momentum, torch's rule (dampening 0; a zero buffer makes the first step's
    buffer the gradient, as torch.optim.SGD does), for every parameter of every head at once.
    On a GPU as torch.optim.SGD(fused=True) runs it: one multi-tensor kernel reads parameter,
    gradient and momentum once and writes parameter and momentum (0.93x the time of the three
    _foreach passes on an H200). On the CPU the fused kernel is the slower one (1.7x the
    _foreach passes here, single-threaded per tensor): there, the three passes
    (docs/benchmarks.md)."""
    with torch.no_grad():
        if params[0].is_cuda:
            torch._fused_sgd_(params, list(grads), bufs, weight_decay=0.0,
                              momentum=cfg.momentum, lr=cfg.lr, dampening=0.0, nesterov=False,
                              maximize=False, is_first_step=False)
            return
        torch._foreach_mul_(bufs, cfg.momentum)
        torch._foreach_add_(bufs, list(grads))
        torch._foreach_add_(params, bufs, alpha=-cfg.lr)
