"""Benchmark of the stages' process start-up (issue 19: the demo's DVC and start-up overhead);
prints one JSON object.

Every DVC stage is a fresh Python process (two for a one-process training stage: the launcher
`python -m seed_core.cluster` and the stage; three with torchrun between them when `--nproc` > 1),
and each pays its imports again. This times, in fresh processes (median of `--repeat`, after one
untimed run that warms the page cache), the start-up of each of those programs up to the end
of its argument parsing (`--help`: module-level imports and argparse, nothing read or written),
and the floors they cannot go below (each ended, as the stages are, without module teardown):
the interpreter alone, `import torch`, `import timm` and `import mlflow` (imported when a stage's
tracking starts, which `--help` does not reach), and `torch + mlflow store`: torch, then MLflow's
import and the opening of an existing SQLite store, whose difference to `import torch` is what
each tracked stage pays before its first record. And the other end, `exit_s`: from a process's
last line to its exit, with torch, timm and MLflow imported, when the interpreter tears its
modules down and when `seed_core.program.run` (what the stage scripts end with) skips that. With
`-X importtime` it lists, per stage, the top-level packages that take longest to import.
The same stage scripts are timed again handed to a `seed_core.warm` server (`warm_startup_s`, as
`make demo` starts them), with the warm floors: the hand-over of an empty script, and opening
the MLflow store in a warm stage (MLflow itself is imported already).

From the committed `dvc.lock` (one entry per stage that `dvc repro` runs, `foreach` expanded) it
sums, over the stages, the start-up of the processes each command starts, and what would go if
every process were cut to the `import torch` floor (those already below it kept): the share of
the demo's overhead that lazier imports could still remove, against the goal of <= 45 s for DVC
and start-up together.

    python bench/bench_startup.py [--repeat 3] [--stages knn,report]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from machine import cpu_name, load_average
from render import OVERHEAD_GOAL_S  # one goal for the benchmark and the page that judges it

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from seed_core import warm  # noqa: E402  (this checkout's)

WARM = str(ROOT / "seed_core" / "warm.py")
FLOORS = {"python": "pass", "import torch": "import torch", "import timm": "import timm",
          "import mlflow": "import mlflow"}
# what every tracked stage pays when its tracking starts (seed_core.tracking.MlflowTracker):
# MLflow's import, then opening the SQLite store (SQLAlchemy and the schema check) and finding
# the experiment; after `import torch`, as in a stage, whose torch has already imported some of
# MLflow's dependencies (numpy among them). The untimed first run creates the store, so the timed
# ones open an existing one.
MLFLOW_STORE = ("import torch; from mlflow.tracking import MlflowClient; "
                "MlflowClient(tracking_uri='sqlite:///{db}').get_experiment_by_name('seed-distill')")
# the end of a stage's process: from its last line to its exit, after the imports a training
# stage has, ended by the interpreter or by seed_core.program.run (os._exit after the handlers)
EXIT_IMPORTS = "import time, torch, timm, mlflow"
EXITS = {"interpreter": f"{EXIT_IMPORTS}\nprint(time.time(), flush=True)",
         "program.run": f"{EXIT_IMPORTS}\nfrom seed_core import program\n"
                        f"program.run(lambda: print(time.time(), flush=True))"}
LAUNCHER = "seed_core.cluster"
TORCHRUN = "torch.distributed.run"
SCRIPT = re.compile(r"stages/([a-z_]+)\.py")


def wall(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=env)
    return time.perf_counter() - started


def exit_seconds(code: str) -> float:
    """From the time `code` prints as its last line to the process's end (its stdout closes)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return time.time() - float(done.stdout.split()[-1])


def median_wall(command: list[str], repeat: int, env: dict[str, str] | None = None) -> float:
    # one untimed run first: the first start reads torch's files from disk (a cold page cache),
    # seconds that no stage of a pipeline run pays after the first
    wall(command, env)
    return statistics.median(wall(command, env) for _ in range(repeat))


class WarmServer:
    """A `seed_core.warm` server of its own (a scratch socket directory), for the warm column;
    ended when the benchmark is done."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="bw", dir="/tmp")
        self.env = {**os.environ, warm.SWITCH_ENV: "1", warm.DIR_ENV: self.directory}
        self.scripts = Path(self.directory) / "scripts"
        self.scripts.mkdir()

    def __enter__(self) -> "WarmServer":
        wall(self.command("pass"), self.env)  # cold: it starts the server
        deadline = time.monotonic() + 120
        while not self._serving() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not self._serving():
            raise RuntimeError(f"no warm-start server came up in {self.directory}")
        return self

    def command(self, code: str) -> list[str]:
        """`python seed_core/warm.py SCRIPT` for a script holding `code`."""
        script = self.scripts / f"s{len(list(self.scripts.iterdir()))}.py"
        script.write_text(code)
        return [sys.executable, WARM, str(script)]

    def _serving(self) -> list[str]:
        return [line for log in Path(self.directory).glob("*.log")
                for line in log.read_text().splitlines() if "serving" in line]

    def __exit__(self, *_) -> None:
        for line in self._serving():
            try:
                os.kill(int(line.rsplit("pid ", 1)[1].rstrip(")")), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(self.directory, ignore_errors=True)


def top_imports(command: list[str], count: int = 4) -> list[dict[str, float | str]]:
    """The top-level packages (depth 0 of `-X importtime`) that take longest, cumulative."""
    done = subprocess.run([command[0], "-X", "importtime", *command[1:]], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    packages: dict[str, float] = {}
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if match:  # depth 0: the name follows the bar with one space only
            name = match.group(2).split(".")[0]
            packages[name] = packages.get(name, 0.0) + int(match.group(1)) / 1e6
    ranked = sorted(packages.items(), key=lambda item: -item[1])[:count]
    return [{"package": name, "seconds": round(seconds, 3)} for name, seconds in ranked]


def processes_of(cmd: str) -> list[str]:
    """The programs a stage's command starts, by the names this benchmark times them under."""
    programs = []
    if LAUNCHER in cmd:
        nproc = re.search(r"--nproc (\d+)", cmd)
        # one process: the launcher runs the stage itself (seed_core.cluster.local_command)
        programs += ["launcher"] + (["torchrun"] if nproc is None or int(nproc.group(1)) > 1
                                    else [])
    programs += [f"stages/{name}.py" for name in SCRIPT.findall(cmd)]
    return programs


def lock_commands(lock: Path) -> dict[str, str]:
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {name: " ".join(entry["cmd"]) if isinstance(entry["cmd"], list) else entry["cmd"]
            for name, entry in stages.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stages", help="comma-separated stage scripts (default: every one "
                                         "that dvc.lock's commands run)")
    args = parser.parse_args(argv)
    python = sys.executable
    commands = lock_commands(ROOT / "dvc.lock")
    scripts = sorted({p for cmd in commands.values() for p in processes_of(cmd)
                      if p.startswith("stages/")})
    if args.stages:
        scripts = [f"stages/{name}.py" for name in args.stages.split(",")]
    load_at_start = load_average()
    # the launcher has no --help (it prints its usage and exits 1): its module import instead
    programs = {"launcher": [python, "-c", f"import {LAUNCHER}"],
                "torchrun": [python, "-m", TORCHRUN, "--help"],
                **{script: [python, script, "--help"] for script in scripts}}
    store = Path(tempfile.mkdtemp(prefix="bench-startup-")) / "mlflow.db"
    floor_code = {**FLOORS, "torch + mlflow store": MLFLOW_STORE.format(db=store)}
    # each floor ends as the stages do (seed_core.program.run: os._exit, no module teardown),
    # so that it counts only what it names
    floors = {name: round(median_wall([python, "-c", f"{code}\nimport os; os._exit(0)"],
                                      args.repeat), 3)
              for name, code in floor_code.items()}
    shutil.rmtree(store.parent)  # the warm store below is a fresh one
    exits = {name: round(statistics.median(exit_seconds(code) for _ in range(args.repeat)), 3)
             for name, code in EXITS.items()}
    startup = {name: round(median_wall(command, args.repeat), 3)
               for name, command in programs.items()}
    # the same scripts handed to a warm-start server (make demo): the client's start, the
    # hand-over and what the server had not imported; and in such a stage, what its tracking's
    # start still costs (opening the store: MLflow is imported already)
    store.parent.mkdir()
    with WarmServer() as server:
        warm_floor_code = {"hand-over": "pass",
                           "mlflow store": MLFLOW_STORE.format(db=store).replace(
                               "import torch; ", "")}
        warm_floors = {name: round(median_wall(server.command(code), args.repeat, server.env),
                                   3) for name, code in warm_floor_code.items()}
        warm_startup = {script: round(median_wall([sys.executable, WARM, script, "--help"],
                                                  args.repeat, server.env), 3)
                        for script in scripts}
    shutil.rmtree(store.parent)
    imports = {name: top_imports(command) for name, command in programs.items()
               if name.startswith("stages/")}
    per_stage = {}
    for stage, cmd in commands.items():
        started = [p for p in processes_of(cmd) if p in startup]
        if len(started) == len(processes_of(cmd)) and started:
            per_stage[stage] = {"processes": started,
                                "seconds": round(sum(startup[p] for p in started), 3)}
    total = sum(entry["seconds"] for entry in per_stage.values())
    # started warm: the launcher stays a fresh process, the stage script is handed over
    warm_total = sum(startup[p] if p not in warm_startup else warm_startup[p]
                     for entry in per_stage.values() for p in entry["processes"])
    # were every process cut to `import torch` at most (those that start below it stay as they are)
    removable = sum(max(0.0, startup[p] - floors["import torch"])
                    for entry in per_stage.values() for p in entry["processes"])
    print(json.dumps({
        "machine": cpu_name(), "load_average_at_start": load_at_start, "repeat": args.repeat,
        "warm_up_runs": 1,
        "python": sys.version.split()[0], "floors_s": floors, "exit_s": exits,
        "startup_s": startup,
        "top_imports": imports, "stages": per_stage,
        "complete": len(per_stage) == len(commands),
        "sum_startup_s": round(total, 1),
        "warm_floors_s": warm_floors, "warm_startup_s": warm_startup,
        "sum_warm_startup_s": round(warm_total, 1),
        "removable_by_lazier_imports_s": round(removable, 1),
        "overhead_goal_s": OVERHEAD_GOAL_S}, indent=1))


if __name__ == "__main__":
    main()
