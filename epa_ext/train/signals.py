"""Ctrl-C and SIGTERM while training: the first finishes the current step, writes a checkpoint and
stops (``RunInterrupted``); a second stops at once (KeyboardInterrupt)."""

from __future__ import annotations

import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after writing a checkpoint; str() says where it is and how to
    go on; signum is the signal (the process exits with 128 + signum)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequests:
    """While active (a context manager, in the main thread), SIGINT and SIGTERM set ``signum``
    instead of stopping the process; the loop polls it between steps. A second signal raises
    KeyboardInterrupt. The previous handlers are restored on exit. Outside the main thread
    (where Python allows no handlers) signals keep their usual effect."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"epa-train: {signal.Signals(signum).name}: stopping after this step to write a checkpoint (again: "
              f"stop at once)", file=sys.stderr, flush=True)
