"""Watching training: a tqdm bar over epochs on a terminal; elsewhere (a log file, a batch
job's output) one plain line every `every` seconds and one at the end, since carriage-return
redraws make a log unreadable. Fed by the trainer after each sync with the device."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from .trainer import Progress


class TrainingProgress:
    """A callable for `train(progress=...)`; `close()` when training is over."""

    def __init__(self, desc: str = "train", stream: TextIO | None = None,
                 every: float = 30.0, terminal: bool | None = None):
        self.desc, self.stream, self.every = desc, stream or sys.stderr, every
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.bar = None
        self.last_line = time.monotonic()
        self.last: Progress | None = None

    def __call__(self, p: Progress) -> None:
        if self.terminal:
            self._bar(p)
        elif time.monotonic() - self.last_line >= self.every:
            self._line(p)
        self.last = p

    def _bar(self, p: Progress) -> None:
        from tqdm import tqdm

        if self.bar is None:
            done = p.epoch - (self.last.epoch if self.last else 0)
            # members stop early, so the time left to --max-epochs is an upper bound
            self.bar = tqdm(total=p.max_epochs, initial=p.epoch - done, unit="epoch",
                            desc=self.desc, file=self.stream, dynamic_ncols=True, leave=False,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} epochs "
                                       "[{elapsed}, at most {remaining} left{postfix}]")
        self.bar.set_postfix_str(self._state(p), refresh=False)
        self.bar.update(p.epoch - self.bar.n)

    @staticmethod
    def _state(p: Progress) -> str:
        return (f"{p.training}/{p.members} members training, best val "
                f"{p.best_val:.4g}, {p.rate:.1f} member-epochs/s")

    def _line(self, p: Progress) -> None:
        print(f"{self.desc}: epoch {p.epoch}/{p.max_epochs}, {self._state(p)}",
              file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def restart(self, stage: str) -> None:
        """A new training from epoch 0 (the next fold of a cross-validation): close this
        one's display and show the next as `desc stage`."""
        self.close()
        self.last = None
        self.desc = f"{self.desc.split(' · ')[0]} · {stage}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()  # the last state is drawn once even when training outran
            # tqdm's redraw interval, then the bar is cleared (leave=False)
            self.bar.close()
            self.bar = None
        elif self.last is not None and not self.terminal:
            self._line(self.last)
