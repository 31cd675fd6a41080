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


OPEN_SHARDS = {
    "benchmark": "open_shards", "machine": "test CPU, 2 CPUs", "load_average_at_start": [0.1] * 3,
    "repeat": 5, "batch": 256, "samples": 1_281_167, "shards": 1_001, "classes": 1_000,
    "index_mib": 73.3, "manifest_kib": 182.3,
    "seconds_median": {"import_s": 0.134, "open_s": 0.0139, "index_s": 0.0085, "steps_s": 0.0,
                       "plan_s": 0.1238, "total_s": 0.1459},
    "seconds_max": {"import_s": 0.135, "open_s": 0.0141, "index_s": 0.0087, "steps_s": 0.0,
                    "plan_s": 0.1265, "total_s": 0.1493},
    "peak_rss_growth_mib_median": 94.1, "peak_rss_growth_open_index_mib_median": 38.9,
    "open_files_delta": 1, "steps_per_epoch": 5_004, "opened_samples": 1_281_167,
    "memory_method": "VmHWM (reset by clear_refs after the imports) minus VmRSS then"}
REMOTE_EPOCH = {
    "benchmark": "remote_epoch", "ok": True, "machine": "test CPU, 2 CPUs", "shards": 20,
    "samples": 400, "served_kib": 1_600.0, "workers": 1, "batch": 20, "repeat": 3,
    "fetch_env": {"SEED_FETCH_TIMEOUT_S": "1.0"}, "stall_s": 2.5, "slow_s": 0.3,
    "samples_read": 400, "manifest_samples": 400, "lost": 0, "duplicated": 0, "unexpected": 0,
    "wrong_labels": 0, "replaced_unreadable": 0, "cache_intact": True, "error": None,
    "faults_injected": {"503": 3, "drop": 1, "slow": 1, "stall": 1},
    "retries_observed": {"503": 3, "drop": 1, "slow": 0, "stall": 1},
    "resumed_with_range": 1, "requests": 28, "files": 22, "healthy_requests": 22,
    "epoch_s_median": {"flaky": 3.1, "healthy": 1.2}}


def test_the_data_benchmarks_render(tmp_path: Path) -> None:
    results = tmp_path / "results"
    assert "`bench/bench_open_shards.py`: not run yet." in render.render(results, tmp_path)
    write(results, "open_shards", OPEN_SHARDS)
    write(results, "remote_epoch", REMOTE_EPOCH)
    text = render.render(results, tmp_path)
    assert "**Opening an ImageNet-sized shard set**" in text
    assert "1,001 shards and 1,281,167 samples" in text
    assert "| all of the above | 145.9 | 149.3 |" in text
    assert "peak memory growth 94.1 MiB (median; 38.9 MiB up to the checked index" in text
    assert "| `503`: HTTP 503 | 3 | 3 | yes |" in text
    assert "| `slow`: reply after 0.3 s (< the timeout: not to be retried) | 1 | 0 | yes |" in text
    assert "0 lost, duplicated or mislabelled, 0 replaced (nothing lost: met)" in text
    assert "took 3.10 s against 1.20 s" in text


def test_a_failed_or_misbehaving_remote_epoch_is_flagged(tmp_path: Path) -> None:
    results = tmp_path / "results"
    retried_slow = copy.deepcopy(REMOTE_EPOCH)
    retried_slow["retries_observed"].update(slow=1, stall=0)
    write(results, "remote_epoch", retried_slow)
    text = render.render(results, tmp_path)
    assert "| 1 | 1 | **no** |" in text and "| 1 | 0 | **no** |" in text
    failed = {**REMOTE_EPOCH, "ok": False, "samples_read": 20, "lost": 380,
              "error": "ShardError: shard-000001.tar: not fetched intact"}
    write(results, "remote_epoch", failed)
    text = render.render(results, tmp_path)
    assert ("**failed**: 20 of 400 samples read, 380 lost, 0 duplicated; ShardError: "
            "shard-000001.tar: not fetched intact.") in text
