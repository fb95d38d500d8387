"""SIGINT / SIGTERM during training: finish the current optimizer step, save a checkpoint, stop cleanly.

A second signal while the first is being handled falls back to the default behaviour (stop at once).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import torch
import torch.distributed as dist

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class StopRequest:
    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def agreed(self, device: torch.device | str = "cpu") -> bool:
        """Whether any process got a signal, the same answer on every process (a collective: call it at the
        same point on all of them). Processes see a signal at different steps; one stopping alone would
        leave the others waiting in their next all-reduce, and maybe without the rank-0 checkpoint."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        signum = torch.tensor(self.signum or 0, device=device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        if self.signum is None and int(signum):
            self.signum = int(signum)
        return self.requested


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # handlers can only live in the main thread
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in HANDLED}

    def handle(signum: int, _frame: FrameType | None) -> None:
        if request.requested:  # second signal: give up on a clean stop
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        request.signum = signum

    for sig in HANDLED:
        signal.signal(sig, handle)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
