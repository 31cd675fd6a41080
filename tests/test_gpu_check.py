"""bench/gpu_check.sh: its --dry-run runs every step of the GPU check on the CPU at tiny sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run_check(tmp_path: Path, *args: str, env: dict | None = None,
              timeout: float = 170) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=tmp_path)


def shadow(tmp_path: Path, *modules: str) -> dict:
    """An environment in which importing each of `modules` fails, as on a machine without it."""
    folder = tmp_path / "shadow"
    folder.mkdir(exist_ok=True)
    for module in modules:
        (folder / f"{module}.py").write_text("raise ImportError('not on this machine')\n")
    return {"PYTHONPATH": str(folder)}


def test_dry_run_runs_every_step_and_prints_a_summary(tmp_path: Path) -> None:
    """Without the packages the GPU machine lacks (MLflow, DVC, matplotlib), every step runs."""
    done = run_check(tmp_path, "--dry-run", "--workdir", str(tmp_path / "work"),
                     env=shadow(tmp_path, "mlflow", "dvc", "matplotlib"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["dry_run"] is True
    for case in ("default", "imagenet"):
        step = summary["step"][case]
        assert step["images_per_s"] > 0 and step["overhead"] > 0
        assert step["speedup_vs_reference"] > 0
    assert summary["distill"]["steps_run"] == 3
    assert summary["distill"]["colour_on"] == "device"
    assert summary["distill_colour_on_cpu"]["steps_run"] == 3
    assert summary["knn"]["recall_vs_exact"] == 1.0
    work = tmp_path / "work"
    for colour_on in ("device", "cpu"):
        assert (work / f"student-{colour_on}").is_dir()
        assert (work / f"distill-{colour_on}.csv").is_file()


def test_missing_package_without_wheels_says_what_to_do(tmp_path: Path) -> None:
    env = shadow(tmp_path, "webdataset")
    done = run_check(tmp_path, "--dry-run", "--workdir", str(tmp_path / "work"), env=env,
                     timeout=60)
    assert done.returncode == 1
    assert "lacks webdataset; pass --wheels DIR" in done.stderr
    # with a wheel folder that does not hold it, pip's failure stops the check
    (tmp_path / "wheels").mkdir()
    done = run_check(tmp_path, "--dry-run", "--wheels", str(tmp_path / "wheels"), "--workdir",
                     str(tmp_path / "work"), env=env, timeout=60)
    assert done.returncode != 0 and "installing webdataset" in done.stderr


def test_unknown_argument_is_refused(tmp_path: Path) -> None:
    done = run_check(tmp_path, "--gpu", timeout=30)
    assert done.returncode == 2 and "unknown argument '--gpu'" in done.stderr
