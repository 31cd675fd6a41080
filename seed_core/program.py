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
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Callable


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
