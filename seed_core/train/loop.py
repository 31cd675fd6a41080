"""The epoch loop: drives a step function over the loaders from a resume position to the end."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from seed_core.progress import progress

log = logging.getLogger(__name__)


def run_epochs(*, start: Any, epochs: int, steps_per_epoch: int,
               make_loader: Callable[[int, int], Iterable[dict]],
               step: Callable[[dict, Any, bool], dict[str, float]],
               scheduler: Any, log_every: int,
               on_log: Callable[[int, Any, dict[str, float]], None],
               checkpoint_every: int | None = None,
               on_checkpoint: Callable[[Any], None] | None = None,
               crash_after: int | None = None, desc: str = "train") -> int:
    """Drive `step` from position `start` (a `resume.Position`) to the end of `epochs`.

    `step(batch, position, want_stats)` runs one optimisation step; the scheduler advances once
    per step; `on_log(global_step, position, metrics)` gets every `log_every`-th step and the last;
    `on_checkpoint(next_position)` every `checkpoint_every` steps. `crash_after` kills the process
    (SIGKILL, as a crash would) after that global step: the resume tests use it.

    Returns the number of steps run.
    """
    import os
    import signal

    total = epochs * steps_per_epoch
    position = start
    ran = 0
    bar = progress(range(total), desc=desc, unit="step", initial=0)
    bar.update(position.epoch * steps_per_epoch + position.step)
    while position.epoch < epochs:
        loader = make_loader(position.epoch, position.step)
        for batch in loader:
            global_step = position.epoch * steps_per_epoch + position.step
            done = global_step + 1
            want_log = done % log_every == 0 or done == total
            metrics = step(batch, position, want_log)
            scheduler.step()
            ran += 1
            bar.update(1)
            if want_log:
                metrics["lr"] = scheduler.get_last_lr()[0]
                on_log(done, position, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            position = position.after(steps_per_epoch)
            if checkpoint_every and on_checkpoint and done % checkpoint_every == 0 and done < total:
                on_checkpoint(position)
            if crash_after is not None and done == crash_after:
                log.warning("crash injected after step %d (SEED_CRASH_AFTER_STEP)", done)
                os.kill(os.getpid(), signal.SIGKILL)
        if position.step != 0:
            raise RuntimeError(f"the loader of epoch {position.epoch} ended after step "
                               f"{position.step} of {steps_per_epoch}")
    bar.close()
    return ran
