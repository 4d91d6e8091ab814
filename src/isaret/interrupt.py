"""SIGINT and SIGTERM handling: the first signal requests a stop after the current step.

A second SIGINT raises KeyboardInterrupt at once, for a user who does not want to wait.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class StopRequest:
    """Installs the handlers for the duration of a `with` block and records the first signal."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.signal_name is not None and name == "SIGINT":
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = name
            log.warning("%s received: stopping after the current step and saving a checkpoint "
                        "(press Ctrl+C again to abort without saving)", name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def stop_signals_blocked():
    """Hold back SIGINT and SIGTERM while DataLoader workers start.

    The workers inherit the blocked mask, so none can die of a signal before
    `ignore_stop_signals_in_worker` runs; the training process gets any held signal on exit.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave SIGINT and SIGTERM to the training process.

    A terminal's Ctrl+C reaches the whole process group. A worker that died of it would make
    the next batch fail before the training process could save its checkpoint.
    """
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
