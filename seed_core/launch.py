"""The frame of the stages that may run under torchrun: params, the process group, the stage's
MLflow run, timing, and the metrics file written by rank 0 (see `seed_core.stagekit` for the
exit statuses)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from seed_core import distributed
from seed_core.config import Params, load_params
from seed_core.io import write_json
from seed_core.stagekit import run_times, setup_logging, tracked, user_errors
from seed_core.tracking import Tracker
from seed_core.train.stop import TrainingStopped

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    params: Params
    runtime: distributed.Runtime
    tracker: Tracker
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def finish(self, metrics_path: str | os.PathLike, summary: dict[str, Any]) -> dict[str, Any]:
        """On rank 0: add the wall time, write the stage's metrics JSON and track the numbers."""
        summary = {**summary, "seconds": round(self.seconds, 3), **run_times()}
        if self.runtime.is_main:
            write_json(metrics_path, summary)
            self.tracker.log_metrics({k: v for k, v in summary.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return summary



@contextlib.contextmanager
def stage(name: str, params_path: str | os.PathLike = "params.yaml",
          overrides: Sequence[str] = ()) -> Iterator[StageContext]:
    """Run a stage body inside its process group and MLflow run (both closed on any exit);
    errors the user fixes exit with status 1 and one line that says what to do."""
    setup_logging()
    with user_errors(name):
        params = load_params(params_path, overrides)
        runtime = distributed.setup(loader_workers=params.data.workers)
        try:
            with tracked(name, params, runtime.is_main, params_path) as tracker:
                yield StageContext(params, runtime, tracker)
        except TrainingStopped as stopped:
            # not an error to fix: SLURM's warning, a preemption or a requeue (the job resumes)
            log.warning("%s %s", name, stopped)
            raise SystemExit(stopped.exit_status) from None
        finally:
            distributed.cleanup()
