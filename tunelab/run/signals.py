"""Ctrl-C and SIGTERM during training: the first signal asks the loop to stop at the next step
boundary (after writing a checkpoint), a second one aborts at once. Both are safe because every
file a run depends on is written atomically (tunelab/run/files.py).

Also the test hook `pause_point`: with `TUNELAB_TEST_PAUSE_AT=write:step-3,eval:2` in the
environment the process prints `TUNELAB_PAUSED <point>` to stderr at those named points and waits
there for a signal, so a test can land a real SIGKILL (or SIGINT) inside a checkpoint write or an
evaluation deterministically. Without the variable it does nothing.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""Shell convention 128 + signal number: what `tunelab train` exits with after a graceful stop."""

_received = 0
"""Signals handled so far by GracefulStop (the test hook waits for this to change)."""


class GracefulStop:
    """Within this context the first SIGINT/SIGTERM sets `requested` (the signal number) instead of
    raising; the loop checks it at each step boundary. A second signal raises KeyboardInterrupt,
    which aborts whatever is running; atomic writes leave nothing half-written behind.
    Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self, announce=None):
        self.requested: int | None = None
        self._announce = announce or _write_stderr
        self._old: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Give the signals back to their previous handlers now (idempotent): from here a signal
        acts at once instead of waiting for a step boundary that will not come."""
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        global _received
        _received += 1
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum
        self._announce(f"tunelab: {signal.Signals(signum).name} received; stopping after this step and "
                       "writing a checkpoint (press Ctrl-C again to abort at once)")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.requested, 130)


def _write_stderr(message: str) -> None:
    """Straight to fd 2: a handler that printed through sys.stderr while the interrupted code was
    printing (a progress bar, a warning) would fail with a reentrant-call RuntimeError."""
    os.write(2, (message + "\n").encode(errors="replace"))


def pause_point(name: str) -> None:
    """Test hook (see the module docstring); free when TUNELAB_TEST_PAUSE_AT is unset."""
    points = os.environ.get("TUNELAB_TEST_PAUSE_AT")
    if not points or name not in points.split(","):
        return
    seen = _received
    print(f"TUNELAB_PAUSED {name}", file=sys.stderr, flush=True)
    while _received == seen:  # a handled signal resumes; SIGKILL ends it here
        time.sleep(0.005)
