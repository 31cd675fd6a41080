"""`bench/bench_startup.py`: which processes each DVC stage starts, and a real (small) run whose
JSON holds what the render reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_startup  # noqa: E402  (bench/ is not a package)
import render  # noqa: E402


def test_a_training_stage_starts_the_launcher_torchrun_and_the_stage() -> None:
    commands = bench_startup.lock_commands(ROOT / "dvc.lock")
    # the demo trains on one process: the launcher runs the stage without torchrun
    assert bench_startup.processes_of(commands["distill"]) == ["launcher", "stages/distill.py"]
    assert bench_startup.processes_of(commands["distill"].replace("--nproc 1", "--nproc 2")) == [
        "launcher", "torchrun", "stages/distill.py"]
    assert bench_startup.processes_of(commands["knn@student"]) == ["stages/knn.py"]
    assert bench_startup.processes_of("echo nothing") == []
    # every stage the demo runs starts at least one timed program
    assert all(bench_startup.processes_of(cmd) for cmd in commands.values())


def test_a_run_times_the_floors_and_the_stage_and_renders() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_startup.py"),
                           "--repeat", "1", "--stages", "knn"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    floors, startup = result["floors_s"], result["startup_s"]
    # the stage imports torch, so it cannot start faster than the interpreter plus torch; the
    # slack is for the test run beside this one on the other core (both were measured warm)
    assert floors["python"] < floors["import torch"] <= startup["stages/knn.py"] * 1.5
    # opening the store imports torch and MLflow first
    assert floors["import torch"] < floors["torch + mlflow store"]
    assert floors["import mlflow"] <= floors["torch + mlflow store"] * 1.5
    assert "torch" in {entry["package"] for entry in result["top_imports"]["stages/knn.py"]}
    # only the kNN stages had every process timed: the sum covers them, and says it is partial
    assert set(result["stages"]) == {"knn@teacher", "knn@baseline", "knn@student"}
    assert result["complete"] is False
    assert abs(result["sum_startup_s"] - 3 * startup["stages/knn.py"]) < 0.2
    text = "\n".join(render.startup_section(result))
    assert "`stages/knn.py`" in text and "not every stage timed" in text
    assert "after one untimed run of each" in text
    exits = result["exit_s"]
    # the teardown skipped is most of the end: a run that tore down both ways fails this
    assert exits["program.run"] < exits["interpreter"] / 2
    saved = exits["interpreter"] - exits["program.run"]
    assert f"3 × {saved:.2f} = {3 * saved:.1f} s less between the stages" in text
    store = floors["torch + mlflow store"] - floors["import torch"]
    assert f"3 × {store:.2f} = {3 * store:.1f} s more" in text
    # handed to a warm-start server, the kNN stage skips torch's import: a hand-over that
    # fell back to a fresh process (or a server that imported nothing) would not be this fast
    warm_floors, warm_startup = result["warm_floors_s"], result["warm_startup_s"]
    assert warm_startup["stages/knn.py"] < floors["import torch"] / 2
    assert warm_floors["hand-over"] < floors["import torch"] / 2
    assert warm_floors["mlflow store"] < store
    assert abs(result["sum_warm_startup_s"] - 3 * warm_startup["stages/knn.py"]) < 0.2
    assert f"{result['sum_warm_startup_s']:.1f} s instead of" in text
