"""What a terminal run shows and how it is stopped: a progress bar, and SIGINT/SIGTERM as a stop request.
Used by the `dopsd` commands (cli.py, toy/cli.py)."""
from __future__ import annotations

import signal
import sys
import time


class ProgressBar:
    """A terminal progress bar with loss and ETA; plain lines when stderr is not a terminal."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stderr  # at call time: tests and wrappers replace it
        self.tty = self.stream.isatty()
        self.every = max(1, total // 20)

    def update(self, info) -> None:
        width = 24
        filled = int(width * info.step / info.total)
        eta = time.strftime("%H:%M:%S", time.gmtime(max(0.0, info.eta_s)))
        line = (f"[{'#' * filled}{'-' * (width - filled)}] {info.step}/{info.total} loss {info.loss:.4g} "
                f"lr {info.lr:.2g} {info.it_per_s:.2f} it/s ETA {eta}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if info.step == info.total else ""))
            self.stream.flush()
        elif info.step % self.every == 0 or info.step == info.total:
            self.stream.write(line + "\n")


class StopOnSignal:
    """SIGINT and SIGTERM (Ctrl-C, schedulers, rented machines) ask the trainer to stop after the
    current step; it then saves that step and raises TrainingCancelled. A second signal while it
    finishes the step or writes the save changes nothing (the save is atomic either way)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.signum, self.name, self._previous = 0, "", {}
        self.announce = announce  # data parallelism: rank 0 speaks for all

    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum, _frame) -> None:
        if not self.signum:
            self.signum, self.name = signum, signal.Signals(signum).name
            if self.announce:
                print(f"\n{self.name}: stopping after this step and saving it", file=sys.stderr)

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
