"""What a benchmark ran on, recorded beside its figures (bench/ is not a package: the scripts
import this as `machine`, from their own directory)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC"), or the architecture where /proc/cpuinfo has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """The 1/5/15-minute load averages, rounded: per-core figures compare only on an idle
    machine, so each result says what ran beside it."""
    return [round(x, 2) for x in os.getloadavg()]
