"""Benchmark of DVC's own time in `dvc repro` (issue 19: the demo's DVC and start-up overhead);
prints one JSON object.

`metrics/pipeline.json` splits the demo's overhead into the stages' start-up and the gaps between
their processes. This measures the gaps from DVC's side: it runs `dvc repro` in-process on a
scratch copy of the pipeline with `make smoke`'s tiny settings (`seed_core.smoke`: every stage,
seconds each) and times, by wrapping DVC's functions from outside, the stages' processes (from
their start to their end: the start-up and the work) and the writes of `dvc.lock` after each
stage, which re-read and rewrite the whole file. The rest of the wall time is DVC's own: checking
each stage's deps, hashing and caching its outputs, the run cache.

    python bench/bench_dvc.py [--repo DIR]   # DIR: an existing DVC repository to repro instead
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from machine import cpu_name, load_average

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seed_core.smoke import pipeline_env, scratch_copy  # noqa: E402


def timed(owner: object, name: str, spent: dict[str, float], calls: dict[str, int],
          key: str) -> None:
    """Wrap `owner.name` so that each call adds its wall time to `spent[key]`."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - started
            calls[key] += 1

    setattr(owner, name, wrapper)


def measure() -> dict:
    """`dvc repro` here, in this process, with the stages' processes and the lock-file writes
    timed."""
    import dvc.dvcfile
    import dvc.stage.run
    from dvc.cli import main as dvc_main

    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    # cmd_run looks `_run` up in its module at each call: one call per stage command
    timed(dvc.stage.run, "_run", spent, calls, "stage_processes")
    timed(dvc.dvcfile.Lockfile, "dump_stages", spent, calls, "lock_writes")
    started = time.perf_counter()
    code = dvc_main(["repro", "--quiet"])
    wall = time.perf_counter() - started
    if code != 0:
        sys.exit(f"dvc repro failed (exit {code}) in {Path.cwd()}")
    processes, writes = spent["stage_processes"], spent["lock_writes"]
    return {"wall_s": round(wall, 2), "stage_commands": calls["stage_processes"],
            "stage_processes_s": round(processes, 2), "dvc_own_s": round(wall - processes, 2),
            "lock_writes": calls["lock_writes"], "lock_writes_s": round(writes, 2),
            "lock_lines": len(Path("dvc.lock").read_text().splitlines())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path,
                        help="an existing DVC repository (default: a tiny scratch copy)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure()))
        return
    scratch = None
    if args.repo is None:
        scratch = Path(tempfile.mkdtemp(prefix="bench-dvc-"))
        repo = scratch_copy(scratch / "repo")
    else:
        repo = args.repo.resolve()
    load_at_start = load_average()
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure"],
                              cwd=repo, env=pipeline_env(repo), capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench_dvc: dvc repro in {repo} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({"machine": cpu_name(), "load_average_at_start": load_at_start,
                      "pipeline": "make smoke's tiny settings" if scratch else str(repo),
                      **result}, indent=1))


if __name__ == "__main__":
    main()
