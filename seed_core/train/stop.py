"""Stopping a training run cleanly on a signal, so that a requeued job resumes where it stopped.

SLURM warns a job before its time limit (SIGUSR1, which the job's batch script passes to the
ranks: `seed_core.cluster`) and ends a preempted or `scontrol requeue`d one with SIGTERM, then
SIGKILL after the cluster's KillWait. The handler only records the signal: the training loop
looks at each step boundary, every rank agrees on the same step (the largest signal number any
rank holds: `distributed.max_over_ranks`), they write a checkpoint there and the stage exits with
128 + the signal's number. Without a signal the check costs one small all-reduce per step on
gloo (none in a one-process run).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, Sequence

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(Exception):
    """Training stopped on `signum` after writing a checkpoint at `epoch`/`step` (the next
    step to run)."""

    def __init__(self, signum: int, epoch: int, step: int) -> None:
        super().__init__(f"stopped on {signal.Signals(signum).name} with a checkpoint at epoch "
                         f"{epoch} step {step}; a re-run (or the requeued job) resumes there")
        self.signum, self.epoch, self.step = signum, epoch, step

    @property
    def exit_status(self) -> int:
        """What a process killed by the signal would report to its shell."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[Callable[[], int]]:
    """Inside, `signals` are recorded instead of ending the process; yields a function that
    returns the first one received (0 when none). The previous handlers come back on exit.
    Off the main thread (where Python cannot set handlers) nothing is caught."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, record) for s in signals}
    try:
        yield lambda: received[0] if received else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
