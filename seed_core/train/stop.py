"""Stopping a training run cleanly on a signal, so that a requeued job resumes where it stopped.

SLURM warns a job before its time limit (SIGUSR1, which the job's batch script passes to the
ranks: `seed_core.cluster`) and ends a preempted or `scontrol requeue`d one with SIGTERM, then
SIGKILL after the cluster's KillWait. The handler only records the signal: the training loop
looks at each step boundary, every rank agrees on the same step (the largest signal number any
rank holds: `distributed.max_over_ranks`), they write a checkpoint there and the stage exits with
128 + the signal's number. A rank that cannot reach a step boundary within `launch.stop_grace_s`
(blocked on a dead peer) exits anyway (`stop_signals`). Without a signal the check costs one
small all-reduce per step on gloo (none in a one-process run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
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
def stop_signals(grace_s: float, signals: Sequence[int] = STOP_SIGNALS
                 ) -> Iterator[Callable[[], int]]:
    """Inside, `signals` are recorded instead of ending the process; yields a function that
    returns the first one received (0 when none). The previous handlers come back on exit.

    A rank blocked in a collective whose peer has died never returns to Python, where the loop
    would see the signal (torchrun sends SIGTERM to the survivors of a dead rank). So a watcher
    thread learns of the signal from the interpreter's wakeup fd and, if the process is still
    inside `grace_s` later, ends it with 128 + the signal, as the signal itself would have.
    Off the main thread (where Python cannot set handlers) nothing is caught.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    left = threading.Event()
    watcher = threading.Thread(target=_end_if_stuck, args=(read_fd, signals, grace_s, left),
                               name="stop-watcher", daemon=True)
    watcher.start()
    previous = {s: signal.signal(s, record) for s in signals}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield lambda: received[0] if received else 0
    finally:
        signal.set_wakeup_fd(previous_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        left.set()
        # wake the watcher with a byte that is no signal: closing our end is not enough, as
        # forked loader workers hold copies of it
        with contextlib.suppress(BlockingIOError):
            os.write(write_fd, b"\0")
        watcher.join()
        os.close(write_fd)
        os.close(read_fd)


def _end_if_stuck(read_fd: int, signals: Sequence[int], grace_s: float,
                  left: threading.Event) -> None:
    """The watcher thread: wait for one of `signals` on the wakeup fd (other signals' bytes go
    by), then give the loop `grace_s` to stop the run and leave `stop_signals`."""
    while True:
        data = os.read(read_fd, 64)
        if left.is_set():
            return
        signum = next((b for b in data if b in signals), 0)
        if signum:
            break
    if left.wait(grace_s):
        return
    sys.stderr.write(f"seed_core.train.stop: no step boundary within {grace_s:g} s of "
                     f"{signal.Signals(signum).name} (a rank waiting on a peer that is gone?): "
                     f"exiting; a re-run resumes from the last checkpoint written\n")
    sys.stderr.flush()
    os._exit(128 + signum)
