"""The README's results section is generated from metrics/: `python -m seed_core.report.readme`
writes it between its markers, and `--check` fails when it is out of date."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seed_core.report.readme import BEGIN, END, main, results_section, splice

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("teacher", "baseline", "student")


def comparison(difference: float, p_value: float) -> dict:
    return {"a_top1": 80.0 + difference, "b_top1": 80.0, "difference": difference,
            "ci_low": difference - 0.6, "ci_high": difference + 0.6, "confidence": 0.95,
            "resamples": 10000, "a_only": 300, "b_only": 100, "p_value": p_value,
            "test": "chi2", "samples": 10000, "significant": p_value < 0.05}


def write_metrics(root: Path) -> Path:
    metrics = root / "metrics"
    metrics.mkdir(parents=True)
    top1 = {"teacher": (79.0, 82.5), "baseline": (59.7, 60.2), "student": (73.4, 75.7)}

    def put(name: str, obj: dict) -> None:
        (metrics / name).write_text(json.dumps(obj))

    for model, (knn, lin) in top1.items():
        put(f"knn_{model}.json", {
            "name": model, "k": 10, "temperature": 0.07, "selected_on": "holdout",
            "configured": {"k": 20, "temperature": 0.07},
            "holdout": {"top1": knn + 1, "top5": 98.0, "samples": 1000, "bank": 9000,
                        "grid_k": [10, 20, 50], "grid_temperature": [0.03, 0.07, 0.1],
                        "k_edge": "lowest", "temperature_edge": None,
                        "grid_top1": {"k10_T0.07": knn + 1, "k20_T0.07": knn + 0.5}},
            "test": {"top1": knn, "top5": 98.5}, "seconds": 0.5})
        put(f"linear_{model}.json", {
            "name": model, "mode": "cached", "epochs": 100, "lr": 1.0, "selected_on": "holdout",
            "holdout": {"top1": lin + 1, "top5": 99.0, "lr_edge": None,
                        "lr_top1": {"0.1": lin, "1": lin + 1, "10": lin - 1}},
            "test": {"top1": lin, "top5": 99.5}, "seconds": 9.0})
    put("paired.json", {protocol: {"teacher_vs_student": comparison(5.6, 1e-12),
                                   "student_vs_baseline": comparison(13.7, 1e-40),
                                   "teacher_vs_baseline": comparison(19.3, 1e-60)}
                        for protocol in ("knn", "linear")})
    put("pretrain_teacher.json", {"role": "teacher", "arch": "resnet18d", "epochs": 12,
                                  "seconds": 330.0})
    put("pretrain_baseline.json", {"role": "baseline", "arch": "mobilenetv3_small_050",
                                   "epochs": 6, "seconds": 97.0})
    put("distill.json", {"teacher_arch": "resnet18d", "student_arch": "mobilenetv3_small_050",
                         "epochs": 6, "seconds": 87.0})
    put("summary.json", {m: {"knn_top1": k, "linear_top1": lin} for m, (k, lin) in top1.items()})
    return metrics


README = f"# project\n\nintro\n\n{BEGIN}\nstale numbers 12.3\n{END}\n\n## after\ntext\n"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_metrics(tmp_path)
    (tmp_path / "README.md").write_text(README)
    return tmp_path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seed_core.report.readme", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_write_then_check(repo: Path) -> None:
    readme = repo / "README.md"
    stale = run_cli(str(readme), "--check")
    assert stale.returncode == 1
    assert "the results section is out of date" in stale.stderr and "-stale numbers" in stale.stderr
    assert readme.read_text() == README  # --check changes nothing
    assert run_cli(str(readme)).returncode == 0
    text = readme.read_text()
    assert text.startswith("# project\n\nintro\n\n" + BEGIN + "\n")
    assert text.endswith(END + "\n\n## after\ntext\n")
    assert "stale numbers" not in text
    assert run_cli(str(readme), "--check").returncode == 0
    before = text
    assert main([str(readme)]) == 0 and readme.read_text() == before  # idempotent


def test_section_content_comes_from_the_metrics(repo: Path) -> None:
    section = results_section(repo / "metrics")
    assert ("| SEED | mobilenetv3_small_050 | SEED | ✓ from resnet18d | 6 | 73.40 | 98.50 | "
            "75.70 | 99.50 |") in section
    assert "| Teacher | resnet18d | MoCo-v2 | – | 12 | 79.00 |" in section
    assert "on 10000 images" in section
    assert "| kNN | SEED − baseline | +13.70 | [+13.10, +14.30] | 300 / 100 | 1.0e-40 | yes |" \
        in section
    assert ("Teacher > SEED > baseline, every step significant (McNemar p < 0.05), holds on "
            "both kNN and linear top-1.") in section
    assert "kNN k and T were chosen per model on a holdout split (10% of train" in section
    assert "SEED student k=10, T=0.07 (k lowest of its grid)" in section
    assert "Compute: 542 s (9.0 min) inside the stages" in section
    assert "`knn_student` 0.5 s" in section and "`pretrain_teacher` 330 s" in section
    assert "Students over seeds" not in section


def test_reproduce_table_appears_when_reproduce_json_exists(repo: Path) -> None:
    reproduce = {"seconds": 3300.0,
                 "teacher": {"arch": "resnet18d", "knn_top1": 79.0, "linear_top1": 82.5},
                 "students": {"resnet10t": {
                     "seed": {"knn_top1": [80.0, 80.5, 79.5], "linear_top1": [83.0, 83.0, 83.0]},
                     "baseline": {"knn_top1": [79.0, 79.0, 79.0],
                                  "linear_top1": [82.0, 82.5, 81.5]}}}}
    (repo / "metrics" / "reproduce.json").write_text(json.dumps(reproduce))
    section = results_section(repo / "metrics")
    assert "Students over seeds (`make reproduce`: 55.0 min inside its stages; teacher " \
        "resnet18d" in section
    assert ("| resnet10t | kNN | 80.00 / 80.50 / 79.50 | 80.00 ± 0.50 | 79.00 / 79.00 / 79.00 | "
            "79.00 ± 0.00 | +1.00 | – (teacher − baseline +0.00) | – |") in section  # no gap
    (repo / "metrics" / "reproduce.json").write_text(json.dumps({**reproduce,
                                                                  "wall_seconds": 3600.0}))
    assert "(`make reproduce`: 60.0 min from the first stage's start to the last one's end, " \
        "55.0 min inside its stages; teacher" in results_section(repo / "metrics")
    # reproduce.json does not count as a stage's compute time
    assert "Compute: 542 s" in section
    reproduce["students"]["resnet10t"]["seed"]["knn_top1"] = [80.0]
    (repo / "metrics" / "reproduce.json").write_text(json.dumps(reproduce))
    done = run_cli(str(repo / "README.md"))
    assert done.returncode == 2 and "lists of different lengths [1, 3]" in done.stderr


def test_the_reproduce_goals_are_stated_with_their_verdicts_and_numbers(repo: Path) -> None:
    goals = {"seed_beats_baseline_significantly_every_seed": False,
             "mean_gain": {"knn_top1": 20.3133, "linear_top1": 19.88}, "mean_gain_goal": 5.0,
             "mean_gain_met": True, "teacher_beats_every_student_significantly": True,
             "smallest_student": "test_resnet", "smallest_params_millions": 0.373,
             "seed_vs_baseline_runs": {"knn_top1": {"better": 8, "worse": 1, "runs": 9},
                                       "linear_top1": {"better": 9, "worse": 0, "runs": 9}},
             "smallest_recovers": {"knn_top1": 0.4547, "linear_top1": None},
             "smallest_recovers_95ci_over_seeds": {"knn_top1": [0.0082, 0.8513],
                                                   "linear_top1": None},
             "recovery_goal": 0.75, "recovery_met": False}
    reproduce = {"seconds": 3300.0,
                 "teacher": {"arch": "resnet18d", "knn_top1": 79.0, "linear_top1": 82.5},
                 "students": {"test_resnet": {
                     "seed": {"knn_top1": [80.0], "linear_top1": [83.0]},
                     "baseline": {"knn_top1": [79.0], "linear_top1": [82.0]}}},
                 "goals": goals}
    (repo / "metrics" / "reproduce.json").write_text(json.dumps(reproduce))
    section = results_section(repo / "metrics")
    assert ("every seed's SEED student significantly above that seed's baseline: **missed** "
            "(kNN 8 of 9 runs significantly better, 1 worse; linear 9 of 9 runs significantly "
            "better, 0 worse); mean gain ≥ 5 points: met (kNN +20.31, linear +19.88); the "
            "teacher significantly above every SEED student on every seed: met; the smallest "
            "student (test_resnet, 0.373 M parameters) recovers ≥ 75% of the gap: **missed** "
            "(kNN 45% [1, 85], linear –;") in section
    del reproduce["goals"]  # older files: the table without the sentence
    (repo / "metrics" / "reproduce.json").write_text(json.dumps(reproduce))
    assert "Goals, as" not in results_section(repo / "metrics")


def test_changed_metrics_make_the_check_fail(repo: Path) -> None:
    readme = repo / "README.md"
    assert main([str(readme)]) == 0
    path = repo / "metrics" / "linear_student.json"
    data = json.loads(path.read_text())
    data["test"]["top1"] = 75.6
    path.write_text(json.dumps(data))
    assert main([str(readme), "--check"]) == 1


def test_missing_markers_or_metrics_are_clear_errors(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs exactly one line '<!-- results: begin -->'"):
        splice("# no markers\n", "x", "README.md")
    with pytest.raises(ValueError, match=r"found 1 and 2"):
        splice(f"{BEGIN}\n{END}\n{END}\n", "x", "README.md")
    (repo / "metrics" / "knn_teacher.json").unlink()
    done = run_cli(str(repo / "README.md"))
    assert done.returncode == 2
    assert "knn_teacher.json: missing; run the `knn@teacher` stage first" in done.stderr


def test_repository_readme_is_up_to_date() -> None:
    """Once README.md has its markers, its results are exactly what metrics/ says."""
    readme = ROOT / "README.md"
    if BEGIN not in readme.read_text():
        pytest.skip("README.md has no results markers yet")
    done = run_cli(str(readme), "--check")
    assert done.returncode == 0, done.stderr
