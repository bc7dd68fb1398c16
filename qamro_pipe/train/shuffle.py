"""Each member's own order of the training rows, epoch by epoch: a counter-based shuffle
(splitmix64 over seed, epoch and row), so a permutation depends on nothing but the member's
seed and the epoch. It is the same on every device, needs no generator state to save or
restore (resume continues the same sequence), and a member of a sweep is shuffled exactly
as the single run with its seed."""
from __future__ import annotations

import torch


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic; logical shifts by masking)."""
    def shr(v, s):
        return (v >> s) & ((1 << (64 - s)) - 1)
    x = (x ^ shr(x, 30)) * -4658895280553007687  # 0xbf58476d1ce4e5b9 as signed
    x = (x ^ shr(x, 27)) * -7723592293110705685  # 0x94d049bb133111eb as signed
    return x ^ shr(x, 31)


def member_permutations(seeds: torch.Tensor, epoch, n: int) -> torch.Tensor:
    """[K] int64 seeds -> [K, n] permutations, identical on every device."""
    idx = torch.arange(n, device=seeds.device, dtype=torch.int64)
    keys = _mix(_mix(seeds[:, None] * 1_000_003 + epoch) + idx[None, :])
    return torch.argsort(keys, dim=1, stable=True)


def member_windows(seeds: torch.Tensor, epoch, counts: torch.Tensor) -> torch.Tensor:
    """[K] int64 seeds, [C] window counts -> [K, C] the window each member takes of each clip
    this epoch (0..count-1), uniform, identical on every device and for a resumed run."""
    idx = torch.arange(len(counts), device=seeds.device, dtype=torch.int64)
    keys = _mix(_mix(seeds[:, None] * 1_000_003 + epoch) + idx[None, :])
    return torch.remainder(keys & ((1 << 62) - 1), counts[None, :])
