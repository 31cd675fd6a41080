"""The frame every stage script runs in: logging, params, process group, tracking, timing."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from seed_core import distributed
from seed_core.config import Params, flatten, load_params
from seed_core.io import write_json
from seed_core.tracking import NullTracker, Tracker, start_tracking


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
        summary = {**summary, "seconds": round(self.seconds, 3)}
        if self.runtime.is_main:
            write_json(metrics_path, summary)
            self.tracker.log_metrics({k: v for k, v in summary.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return summary


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


@contextlib.contextmanager
def tracked(name: str, params: Params | None, is_main: bool = True) -> Iterator[Tracker]:
    """The stage's MLflow child run (a no-op tracker without params); closed as FAILED if the
    body raises, so a crashed stage never shows as finished in the UI."""
    tracker = (start_tracking(os.environ.get("DVC_STAGE", name), flatten(params),
                              params.mlflow.experiment, is_main)
               if params is not None else NullTracker())
    try:
        yield tracker
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close()


@contextlib.contextmanager
def stage(name: str, params_path: str | os.PathLike = "params.yaml") -> Iterator[StageContext]:
    """Run a stage body inside its process group and MLflow run (both closed on any exit)."""
    setup_logging()
    params = load_params(params_path)
    runtime = distributed.setup()
    try:
        with tracked(name, params, runtime.is_main) as tracker:
            yield StageContext(params, runtime, tracker)
    finally:
        distributed.cleanup()
