"""Stop requests: SIGINT/SIGTERM ask the training loop to save and stop (see _Stop); in a command
without a loop to save, Ctrl-C is one line and exit 130 (exit_on_interrupt, run_main)."""
from __future__ import annotations

import os
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


INTERRUPTED = "interrupted; files written so far are whole, nothing more was written"


def exit_on_interrupt(prog: str):
    """Until main() starts (run_main, or the default handler put back): Ctrl-C (SIGINT) ends the
    process at once with one line and exit code 130. For a script's own imports, which write
    nothing: no exception, which Python 3.11 would wrap in a RuntimeError in a class body."""
    def handler(signum, frame):
        print(f"{prog}: interrupted while starting; nothing was written", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    signal.signal(signal.SIGINT, handler)


def run_main(prog: str, main) -> int:
    """main()'s exit code, or 130 with one line on stderr when Ctrl-C interrupts it (as
    KeyboardInterrupt, so `finally` blocks run and atomic writes leave no temporary)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except KeyboardInterrupt:
        pass
    except Exception as e:  # an error that an interrupt caused: Python 3.11 wraps one inside a class body (e.g.
        if not _caused_by_interrupt(e):  # while torch imports); a module cut short mid-import fails later
            raise
    print(f"{prog}: {INTERRUPTED}", file=sys.stderr)
    return 128 + signal.SIGINT


def _caused_by_interrupt(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt stands in `error`'s chain (raised from it, or while handling it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
