"""Stopping on a signal (seed_core.train.stop): recorded, not fatal; the loop stops at the next
step boundary with one checkpoint there. The stages' end-to-end behaviour (a signal to one rank
of two, the exit status, the resume) is in tests/test_train_stages.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from seed_core.train.loop import StepTimes, run_steps
from seed_core.train.resume import Position
from seed_core.train.stop import TrainingStopped, stop_signals

ROOT = Path(__file__).resolve().parent.parent


class Scheduler:
    def step(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [0.1]


def loop(stop_after: int | None, checkpoint_every: int | None = None,
         steps: list | None = None, saved: list | None = None) -> tuple[list, list]:
    """10 steps (4 per epoch); a stop signal shows up once `stop_after` steps have run. Fills
    and returns the positions of the steps run and of the checkpoints written."""
    steps = [] if steps is None else steps
    saved = [] if saved is None else saved

    def step(batch, position, want_stats):
        steps.append(position)
        return {"loss": 1.0}

    run_steps(start=Position(0, 0), total_steps=10, steps_per_epoch=4,
              batches=iter([{}] * 10), step=step, scheduler=Scheduler(), log_every=100,
              times=StepTimes(), on_log=lambda *a: None, checkpoint_every=checkpoint_every,
              on_checkpoint=saved.append,
              stop_signal=lambda: signal.SIGTERM if stop_after is not None and
              len(steps) >= stop_after else 0)
    return steps, saved


def test_a_stop_signal_checkpoints_at_the_next_step_boundary_and_raises() -> None:
    steps, saved = [], []
    with pytest.raises(TrainingStopped) as stopped:
        loop(stop_after=6, steps=steps, saved=saved)
    # 6 steps ran: the next is epoch 1 step 2, and the one checkpoint holds that position
    assert len(steps) == 6 and saved == [Position(1, 2)]
    assert (stopped.value.epoch, stopped.value.step) == (1, 2)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.exit_status == 143
    assert "stopped on SIGTERM with a checkpoint at epoch 1 step 2" in str(stopped.value)


def test_a_periodic_checkpoint_at_that_step_is_not_written_twice() -> None:
    saved = []
    with pytest.raises(TrainingStopped):
        loop(stop_after=6, checkpoint_every=3, saved=saved)
    assert saved == [Position(0, 3), Position(1, 2)]
    saved = []
    with pytest.raises(TrainingStopped):
        loop(stop_after=5, checkpoint_every=3, saved=saved)
    assert saved == [Position(0, 3), Position(1, 1)]


def test_no_signal_or_one_after_the_last_step_trains_to_the_end() -> None:
    steps, saved = loop(stop_after=None, checkpoint_every=3)
    assert len(steps) == 10 and saved == [Position(0, 3), Position(1, 2), Position(2, 1)]
    steps, saved = loop(stop_after=10)  # only the last step sees it: nothing left to stop
    assert len(steps) == 10 and saved == []


def test_stop_signals_records_instead_of_ending_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with stop_signals(grace_s=60) as received:
        assert received() == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # without the handler: the process would end
        os.kill(os.getpid(), signal.SIGTERM)
        assert received() == signal.SIGUSR1  # the first one counts
    assert signal.getsignal(signal.SIGUSR1) is before


def run_python(code: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.time()
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    return done, time.time() - started


def test_a_rank_that_never_reaches_a_step_boundary_exits_after_the_grace() -> None:
    """As a rank blocked on a dead peer: the signal is recorded, the loop never looks."""
    done, seconds = run_python("""
        import os, signal, time
        from seed_core.train.stop import stop_signals
        with stop_signals(grace_s=1) as received:
            os.kill(os.getpid(), signal.SIGTERM)
            print("recorded", received(), flush=True)
            time.sleep(30)
    """)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert done.stdout == f"recorded {int(signal.SIGTERM)}\n"
    assert "no step boundary within 1 s of SIGTERM" in done.stderr
    assert seconds < 15


def test_leaving_within_the_grace_keeps_the_process() -> None:
    done, _ = run_python("""
        import os, signal, time
        from seed_core.train.stop import stop_signals
        with stop_signals(grace_s=1) as received:
            os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(2)
        print("alive", flush=True)
    """)
    assert done.returncode == 0 and done.stdout == "alive\n", done.stderr


def test_leaving_is_immediate_while_forked_workers_hold_the_pipe() -> None:
    """Loader workers forked inside inherit the watcher's pipe: waiting for its end-of-file kept
    every training stage 5 s longer (and left the thread reading a closed descriptor)."""
    import multiprocessing
    import threading

    started = time.time()
    with stop_signals(grace_s=60):
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,),
                                                             daemon=True)
        worker.start()
    try:
        assert time.time() - started < 1.0
        assert "stop-watcher" not in [t.name for t in threading.enumerate()]
    finally:
        worker.kill()  # it inherited the recording handler: SIGTERM would not end it
        worker.join()
