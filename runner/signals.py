"""Stop requests: SIGINT/SIGTERM ask the training loop to save and stop (see _Stop); in a command
without a loop to save, Ctrl-C is one line and exit 130 (exit_on_interrupt)."""
from __future__ import annotations

import signal
import sys
import time


class _Stop:
    """SIGINT/SIGTERM set `requested`: the loop stops after the current step (under torchrun at the
    next point where the ranks agree) and saves where it is. A repeat within 2 s counts as the same
    request (a cluster often signals every process and torchrun forwards the signal again); a later
    one stops at once (KeyboardInterrupt; `hard` holds its number) unless the stop is already
    agreed and being saved (`escalate` False)."""
    requested = hard = 0
    escalate = True
    first_at = 0.0

    def install(self):
        self.requested = self.hard = 0
        self.escalate = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.requested:
            self.requested, self.first_at = signum, now
        elif self.escalate and now - self.first_at > 2.0:
            self.hard = signum
            raise KeyboardInterrupt


STOP = _Stop()


def exit_on_interrupt(prog: str):
    """From now on, Ctrl-C (SIGINT) ends the program at once, wherever it arrives (imports, work,
    writing) with one line and exit code 130: SystemExit, so `finally` blocks run and atomic writes
    leave no temporary; further Ctrl-Cs are ignored while it exits (one line, never a traceback)."""
    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"{prog}: interrupted; files written so far are whole, nothing more was written", file=sys.stderr)
        sys.exit(128 + signum)
    signal.signal(signal.SIGINT, handler)
