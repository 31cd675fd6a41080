"""The performance section (docs/performance.md) is rendered from the benchmarks' JSON and judged
there."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import render  # noqa: E402  (bench/ is not a package)

STEP_CASE = {
    "case": {"teacher": "resnet18d", "student": "mobilenetv3_small_050", "batch": 256, "size": 32,
             "queue": 4096, "embed": 128},
    "seconds": {name: {"median_s": value} for name, value in (
        ("teacher_forward", 0.06), ("student_forward_backward_sgd", 0.08),
        ("queue_floor_plain", 0.012), ("seed_loss_alone", 0.013), ("full_step", 0.15),
        ("reference_step", 0.20))},
    "precision": {"teacher": "bf16", "student": "fp32"},
    "queue_floor_s": 0.013, "parts_sum_s": 0.153, "overhead": 0.98,
    "speedup_vs_reference": 1.33, "queue_share_of_parts": 0.09,
    "images_per_s": {"full_step": 1700.0, "reference_step": 1280.0}}
STEP = {"benchmark": "step", "machine": "test CPU", "torch": "2.14.1", "clock": "wall",
        "threads": 2, "repeats": 5, "load_average_at_start": [0.1, 0.1, 0.1],
        "goals": {"overhead_max": 1.10, "speedup_min_small_images": 1.2},
        "cases": {"default": STEP_CASE}}


def write(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_the_readme_section_is_current() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "render.py"),
                           str(ROOT / "docs" / "performance.md"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_goals_are_judged_from_the_figures(tmp_path: Path) -> None:
    results, metrics = tmp_path / "results", tmp_path / "metrics"
    write(results, "step", STEP)
    met = render.render(results, metrics)
    assert "| 0.98 met | 1.33 met | 1,700 |" in met and "9%" in met
    slow = copy.deepcopy(STEP)
    slow["cases"]["default"].update(overhead=1.4, speedup_vs_reference=1.05)
    write(results, "step", slow)
    missed = render.render(results, metrics)
    assert "| 1.40 **missed** | 1.05 **missed** |" in missed
    assert "`bench/bench_knn.py`: not run yet." in missed


def test_pipeline_overhead_and_data_wait_are_judged(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    write(metrics, "distill", {"images_per_s": 1300.0, "data_wait_fraction": 0.08})
    write(metrics, "pipeline", {"one_run": True, "stages": 18, "wall_seconds": 700.0,
                                "stage_seconds": 640.0, "overhead_seconds": 60.0,
                                "startup_seconds": 35.0, "between_stages_seconds": 25.0})
    text = render.render(tmp_path / "results", metrics)
    assert "| distill | 1,300 | 8.0% | **missed** |" in text
    assert "= 60 s (goal ≤ 45 s: **missed**)" in text


def test_check_fails_on_a_stale_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{render.BEGIN}\nold numbers\n{render.END}\nrest\n")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "render.py"), str(readme),
                           "--check"], capture_output=True, text=True)
    assert done.returncode == 1 and "stale" in done.stderr
