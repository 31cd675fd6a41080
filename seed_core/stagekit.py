"""The frame every stage script runs in: logging, errors the user fixes, MLflow tracking
(without torch, so stages that only read and write files start fast; `seed_core.launch.stage`
adds the process group).

Exit status of every stage: 0 done; 1 an error the user fixes (a bad param, a missing or corrupt
input, a full disk), printed as one line `<stage>: error: <file/key/value>: <what to do>` without
a traceback; 2 a command-line usage error (argparse). Anything else is a bug: Python prints its
traceback (status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import Iterator

from seed_core.config import Params, flatten
from seed_core.io import UserError, is_disk_full
from seed_core.program import process_started_at
from seed_core.tracking import NullTracker, Tracker, start_tracking

EXIT_USER_ERROR = 1


def run_times() -> dict[str, float]:
    """`started_at` (the process's start) and `finished_at` (now), Unix seconds, for a stage's
    metrics: the report adds the gaps between stages up into DVC's and start-up overhead."""
    return {"started_at": round(process_started_at(), 3), "finished_at": round(time.time(), 3)}


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def user_error_message(name: str, err: BaseException) -> str | None:
    """The one line a stage prints for an error the user fixes; None for a bug."""
    if isinstance(err, UserError):
        return f"{name}: error: {err}"
    if isinstance(err, FileNotFoundError):
        if err.filename is None:  # raised with its own message, e.g. by load_split
            return f"{name}: error: {err}"
        return (f"{name}: error: {err.filename}: no such file or directory; check the path "
                f"(another stage's output? `dvc repro` makes it)")
    if is_disk_full(err):
        return (f"{name}: error: {err.filename or 'an output'}: could not be written: "
                f"{err.strerror or err}. Free space (or raise the file-size limit), then re-run")
    return None


@contextlib.contextmanager
def user_errors(name: str) -> Iterator[None]:
    """Turn an error the user fixes into one line on stderr and exit status 1 (no traceback);
    a bug keeps its traceback."""
    try:
        yield
    except Exception as err:
        message = user_error_message(name, err)
        if message is None:
            raise
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


@contextlib.contextmanager
def tracked(name: str, params: Params | None, is_main: bool = True,
            params_path: str | os.PathLike = "params.yaml") -> Iterator[Tracker]:
    """The stage's MLflow child run (a no-op tracker without params); closed as FAILED if the
    body raises, so a crashed stage never shows as finished in the UI. `params_path` is the
    file `params` came from: the parent run lists what differs from its committed version."""
    tracker = (start_tracking(os.environ.get("DVC_STAGE", name), flatten(params),
                              params.mlflow.experiment, is_main, params_path)
               if params is not None else NullTracker())
    try:
        yield tracker
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close()


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    """`--params FILE` and repeatable `--set section.key=value` (what `dvc exp run -S` does to
    params.yaml, for one run: `make reproduce` runs a student per seed this way)."""
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one params value")
