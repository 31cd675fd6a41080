"""How a stage script ends: everything the end of a Python program does, without the teardown.

After its last line, a process that has imported torch, timm and MLflow spends 0.7 to 1.6 s
clearing its modules and freeing their objects (`bench/bench_startup.py`'s `exit_s`), once per
stage of a pipeline, between one stage's end and DVC's start of the next. `run(main)` does what
that end must still do, in the interpreter's order, and then ends the process at once:

1. waits for the non-daemon threads;
2. runs the exit handlers (`atexit`): logging flushes and closes its files, multiprocessing ends
   its daemonic children (DataLoader workers), torch and MLflow run theirs;
3. flushes stdout and stderr;
4. `os._exit` with the status the program would have had: `main`'s return value or
   `SystemExit`'s code (None 0, an int as is, anything else printed to stderr and 1).

An uncaught exception other than `SystemExit` ends the ordinary way (traceback, status 1,
teardown): failures are rare, and keep every guarantee.

    if __name__ == "__main__":
        program.run(main)

`process_started_at` is where a stage's `started_at` comes from: the start of the process DVC
started, also when `seed_core.warm` handed the stage to a forked process.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Callable

# `<pid>:<Unix seconds>`: the start of the command whose work the process `pid` does (set by
# `seed_core.warm` in the process it forks for a stage); other processes ignore it
STARTED_AT_ENV = "SEED_STARTED_AT"
_IMPORTED_AT = time.time()


def started_at_of(value: str | None, pid: int) -> float | None:
    """The start time `STARTED_AT_ENV`'s `value` gives process `pid`, or None if it names another
    process (a child inherits the variable, not its parent's start) or is malformed."""
    owner, _, seconds = (value or "").partition(":")
    try:
        return float(seconds) if int(owner) == pid else None
    except ValueError:
        return None


def start_ticks(pid: int | str = "self") -> str:
    """Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot
    (Linux); "" where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # the name before ")" may hold spaces
        return fields[19]
    except (OSError, IndexError):
        return ""


def process_started_at() -> float:
    """When this process's command started (Unix time): the hand-over's start for a stage that
    `seed_core.warm` forked, else from /proc on Linux (10 ms ticks since boot, so interpreter
    start-up and imports count), else when this module was imported."""
    handed_over = started_at_of(os.environ.get(STARTED_AT_ENV), os.getpid())
    if handed_over is not None:
        return handed_over
    try:
        since_boot = int(start_ticks()) / os.sysconf("SC_CLK_TCK")
        uptime = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, AttributeError):
        return _IMPORTED_AT
    return time.time() - (uptime - since_boot)


def exit_status(code: object) -> int:
    """The process status the interpreter gives `SystemExit(code)`; a message is printed."""
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    print(code, file=sys.stderr)
    return 1


def finish(status: int) -> None:
    """End the process with `status` after the non-daemon threads, the exit handlers and the
    stdio flush, skipping the module teardown."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    # CPython's own entry to the handlers `atexit.register` collected (it empties the list, so
    # none runs twice); the interpreter would call it at this point of its shutdown
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to save
            pass
    os._exit(status)


def run(main: Callable[[], object]) -> None:
    """Call `main` as the program and end the process without the interpreter's teardown."""
    try:
        status = exit_status(main())
    except SystemExit as stop:
        status = exit_status(stop.code)
    finish(status)
