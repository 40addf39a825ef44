"""Progress output: one line per epoch (epoch, loss, accuracy, images/s, time left); on a terminal
also an in-place step counter within the epoch. Epochs count the whole schedule from 1 ("epoch
3/200"); the time left is this stage's, so it names the epoch the stage ends at when that is not
the last one ("left 4m10s to epoch 160")."""

from __future__ import annotations

import sys
import time


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, stage: str, first_epoch: int, until: int, total: int, stream=None):
        self.stage, self.first, self.until, self.total = stage, first_epoch, until, total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def batch(self, step: int, steps: int) -> None:
        if self.tty:
            self.stream.write(f"\r  {self.stage} step {step}/{steps}")
            self.stream.flush()

    def epoch(self, row: dict) -> None:
        done = row["epoch"] + 1 - self.first
        left = (time.perf_counter() - self.t0) / max(done, 1) * (self.until - row["epoch"] - 1)
        test = f" test {100 * row['test_acc']:.2f}%" if "test_acc" in row else ""
        line = (f"{self.stage} epoch {row['epoch'] + 1}/{self.total} lr {row['lr']:.5f} "
                f"loss {row['train_loss']:.4f} train {100 * row['train_acc']:.2f}%{test} "
                f"{row['images_per_s']:.0f} img/s left {_hms(left)}"
                + (f" to epoch {self.until}" if self.until != self.total else ""))
        self.stream.write(("\r" if self.tty else "") + line + "\n")
        self.stream.flush()
