"""What a person sees while a run trains, besides the epoch lines: a progress bar in a terminal, a
progress line at a fixed interval when stdout is not a terminal (nohup, Slurm, `> log.txt`), and
the epoch metrics as TensorBoard scalars (--tensorboard).

Nothing here reads a tensor: the running loss is handed over as text by the training loop at its
host-sync points (the first step of an epoch and every 50 steps), so progress costs no extra sync.
"""
from __future__ import annotations

import sys
import time

from runner.config import UsageError


class Progress:
    """Counts optimizer steps over the whole run. In a terminal: a tqdm bar (at the bottom; lines
    printed through `tqdm.external_write_mode`, as RunLog does, appear above it) with the running
    loss. Otherwise: every `every_s` seconds (0 = never) one line
    `  epoch E/N step S/M  loss L  I img/s  ETA m:ss (epoch)`, where img/s is measured from the
    epoch's first counted step (evaluation time is not in it) and ETA is the rest of the epoch."""

    def __init__(self, *, total, steps_per_epoch, epochs, done, images_per_step, active, every_s, file=None):
        from tqdm import tqdm
        self.file = file if file is not None else sys.stdout
        self.active = active
        self.tty = active and self.file.isatty()
        self.bar = tqdm(total=total, disable=not self.tty, leave=False, dynamic_ncols=True, desc="train",
                        file=self.file)
        self.spe, self.epochs, self.step, self.every_s = steps_per_epoch, epochs, done, every_s
        self.images_per_step = images_per_step
        self.loss = None
        self.epoch_start = None  # (step, time) of the first step counted in the current epoch
        self.last_line = time.monotonic()

    @property
    def wants_loss(self):
        """Whether the running loss is shown (the loop then reads it at its sync points)."""
        return self.active

    def update(self, n=1):
        self.bar.update(n)
        now = time.monotonic()
        if self.epoch_start is None or self.step % self.spe == 0:  # an epoch's (or a session's) first step
            self.epoch_start = (self.step, now)
        self.step += n
        if self.active and not self.tty and self.every_s > 0 and now - self.last_line >= self.every_s:
            self.last_line = now
            print(self.line(now), file=self.file, flush=True)

    def line(self, now):
        epoch, in_epoch = divmod(self.step - 1, self.spe)
        first, t0 = self.epoch_start
        rate = (self.step - 1 - first) / (now - t0) if now > t0 and self.step - 1 > first else 0.0
        text = f"  epoch {epoch + 1}/{self.epochs} step {in_epoch + 1}/{self.spe}"
        if self.loss is not None:
            text += f"  loss {self.loss}"
        if rate > 0:
            eta = int((self.spe - in_epoch - 1) / rate)
            text += f"  {rate * self.images_per_step:.0f} img/s  ETA {eta // 60}:{eta % 60:02d} (epoch)"
        return text

    def set_postfix(self, loss, refresh=False):
        """The running loss of the epoch so far (text), read by the loop at a sync point."""
        self.loss = loss
        self.bar.set_postfix(loss=loss, refresh=refresh)

    def close(self):
        self.bar.close()


def require_tensorboard():
    """UsageError (one line, before any folder is made) when --tensorboard cannot work."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        raise UsageError("tensorboard: --tensorboard needs the tensorboard package (pip install tensorboard)") from None


class TensorBoardLog:
    """Each metrics.jsonl row as TensorBoard scalars (step = epoch) in event files in the run
    folder: train/loss, train/error, test/loss, test/error (epochs with evaluation), lr,
    epoch_time_s, and under fp16 loss_scale and skipped_steps. A resumed run purges the events of
    epochs after its checkpoint, so a redone epoch appears once."""

    TAGS = {"train_loss": "train/loss", "train_error": "train/error", "test_loss": "test/loss",
            "test_error": "test/error", "lr": "lr", "epoch_time_s": "epoch_time_s",
            "loss_scale": "loss_scale", "skipped_steps": "skipped_steps"}

    def __init__(self, run_dir, start_epoch):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=run_dir, purge_step=start_epoch + 1 if start_epoch else None)

    def add(self, row):
        for key, tag in self.TAGS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()

    def close(self):
        self.writer.close()
