"""The training loop: drives a step function over the batches from a resume position to the end,
timing how long each step waited for its batch and how long it computed (as timm logs
`data_time` and `batch_time`), so a starving loader shows in the curves."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from seed_core.progress import progress
from seed_core.train.resume import Position
from seed_core.train.stop import TrainingStopped

log = logging.getLogger(__name__)


@dataclass
class StepTimes:
    """Seconds waiting for batches (`data`) and computing steps (`compute`), summed."""

    data: float = 0.0
    compute: float = 0.0
    steps: int = 0

    def add(self, data: float, compute: float) -> None:
        self.data += data
        self.compute += compute
        self.steps += 1

    @property
    def data_wait_fraction(self) -> float:
        """Summed data wait over the summed wall time of the steps (wait + compute)."""
        total = self.data + self.compute
        return self.data / total if total > 0 else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"data": self.data, "compute": self.compute, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.data, self.compute, self.steps = state["data"], state["compute"], int(state["steps"])


def run_steps(*, start: Position, total_steps: int, steps_per_epoch: int,
              batches: Iterable[dict[str, Any]],
              step: Callable[[dict[str, Any], Position, bool], dict[str, float]],
              scheduler: Any, log_every: int, times: StepTimes,
              on_log: Callable[[int, Position, dict[str, float]], None],
              checkpoint_every: int | None = None,
              on_checkpoint: Callable[[Position], None] | None = None,
              on_epoch_end: Callable[[int], None] | None = None,
              stop_signal: Callable[[], int] | None = None, desc: str = "train") -> int:
    """Run `step(batch, position, want_stats)` from `start` to `total_steps`.

    The scheduler advances once per step; `on_log(global_step, position, metrics)` gets every
    `log_every`-th step and the last, with `data_seconds` and `step_seconds` (means since the
    previous log); `on_checkpoint(next_position)` runs every `checkpoint_every` steps and
    `on_epoch_end(epoch)` after each epoch's last step. After every step but the last,
    `stop_signal()` (collective) returns the signal that asks the run to stop, or 0: the loop then
    writes a checkpoint (unless it just did) and raises `TrainingStopped` (`seed_core.train.stop`).

    Returns:
        The number of steps run.
    """
    position = start
    ran = 0
    since_log = StepTimes()
    bar = progress(range(total_steps), desc=desc, unit="step")
    bar.update(position.global_step(steps_per_epoch))
    iterator = iter(batches)
    waited = time.perf_counter()
    while position.global_step(steps_per_epoch) < total_steps:
        try:
            batch = next(iterator)
        except StopIteration:
            raise RuntimeError(f"the loader ended before step {position.step} of epoch "
                               f"{position.epoch} ({steps_per_epoch} steps per epoch)") from None
        ready = time.perf_counter()
        done = position.global_step(steps_per_epoch) + 1
        want_log = done % log_every == 0 or done == total_steps
        metrics = step(batch, position, want_log)
        scheduler.step()
        finished = time.perf_counter()
        times.add(ready - waited, finished - ready)
        since_log.add(ready - waited, finished - ready)
        ran += 1
        bar.update(1)
        if want_log:
            metrics.update(lr=scheduler.get_last_lr()[0],
                           data_seconds=since_log.data / since_log.steps,
                           step_seconds=since_log.compute / since_log.steps)
            since_log = StepTimes()
            on_log(done, position, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        epoch_ended = position.step + 1 == steps_per_epoch
        position = position.after(steps_per_epoch)
        if epoch_ended and on_epoch_end is not None:
            on_epoch_end(position.epoch - 1)
        checkpointed = bool(checkpoint_every and on_checkpoint and done % checkpoint_every == 0
                            and done < total_steps)
        if checkpointed:
            on_checkpoint(position)
        signum = stop_signal() if stop_signal is not None and done < total_steps else 0
        if signum:
            if on_checkpoint is not None and not checkpointed:
                on_checkpoint(position)
            bar.close()
            raise TrainingStopped(signum, position.epoch, position.step)
        waited = time.perf_counter()
    bar.close()
    return ran
