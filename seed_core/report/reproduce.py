"""`make reproduce`'s summary: every student's MoCo-v2 baseline and SEED runs over seeds, the
paired tests of each seed's SEED student against the same seed's baseline, and whether the
paper's claims hold (pure functions over the runs' metrics and prediction files).

Runs live in `RUNS/<arch>/<seed>/<method>/` (method `baseline` or `seed`), each holding the kNN
and linear stages' `knn.json`, `linear.json` and per-sample predictions `knn.safetensors`,
`linear.safetensors`, and the training stage's `train.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from seed_core.evaluation.stats import ALPHA, mean_interval, seed_spread
from seed_core.io import read_json
from seed_core.report.comparisons import compare_files, seed_tests
from seed_core.report.tables import gap_recovery

METHODS = ("baseline", "seed")
PROTOCOL_OF = {"knn_top1": "knn", "linear_top1": "linear"}
GAIN_GOAL = 5.0  # mean SEED - baseline points over students (issue 11)
RECOVERY_GOAL = 0.75  # share of the baseline-to-teacher gap the smallest student closes


def run_dir(runs: Path, arch: str, seed: int, method: str) -> Path:
    return runs / arch / str(seed) / method


def gather(runs: Path, students: Sequence[str], seeds: Sequence[int],
           teacher: Mapping[str, Any], teacher_predictions: Mapping[str, Path]
           ) -> dict[str, Any]:
    """The `metrics/reproduce.json` object (without `seconds`): per student and method, the
    per-seed test top-1 of kNN and linear (seeds in `seeds` order), the per-seed paired tests
    against the baseline, and the teacher against each seed's SEED student."""
    out: dict[str, Any] = {"teacher": dict(teacher), "seeds": list(seeds), "students": {}}
    for arch in students:
        entry: dict[str, Any] = {}
        for method in METHODS:
            entry[method] = {metric: [read_json(run_dir(runs, arch, s, method) /
                                                f"{protocol}.json")["test"]["top1"]
                                      for s in seeds]
                             for metric, protocol in PROTOCOL_OF.items()}
        entry["paired"] = {metric: seed_tests(
            [run_dir(runs, arch, s, "seed") / f"{protocol}.safetensors" for s in seeds],
            [run_dir(runs, arch, s, "baseline") / f"{protocol}.safetensors" for s in seeds],
            f"{runs}/{arch}") for metric, protocol in PROTOCOL_OF.items()}
        entry["teacher_vs_seed"] = {metric: [compare_files(
            teacher_predictions[protocol],
            run_dir(runs, arch, s, "seed") / f"{protocol}.safetensors") for s in seeds]
            for metric, protocol in PROTOCOL_OF.items()}
        out["students"][arch] = entry
    return out


def mean(values: Sequence[float]) -> float:
    return seed_spread(values).mean


def check_goals(result: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, Any]:
    """Issue 11's goals for the student table, each with the numbers it was judged on.

    - every seed's SEED student beats that seed's baseline, significantly (McNemar p < ALPHA),
      on kNN and linear top-1;
    - the gain, averaged over seeds then over students, is at least GAIN_GOAL points on both;
    - the teacher beats every SEED student on every seed (significantly, paired test);
    - the smallest student (fewest backbone parameters, `sizes`) closes at least RECOVERY_GOAL
      of the baseline-to-teacher gap, on seed means: (SEED - baseline) / (teacher - baseline).
    """
    students = result["students"]
    teacher = result["teacher"]
    beats = all(t["difference"] > 0 and t["p_value"] < ALPHA
                for entry in students.values() for metric in PROTOCOL_OF
                for t in entry["paired"][metric])
    gains = {metric: mean([mean(e["seed"][metric]) - mean(e["baseline"][metric])
                           for e in students.values()]) for metric in PROTOCOL_OF}
    teacher_wins = all(t["difference"] > 0 and t["p_value"] < ALPHA
                       for entry in students.values() for metric in PROTOCOL_OF
                       for t in entry["teacher_vs_seed"][metric])
    counts = {metric: {"better": sum(t["difference"] > 0 and t["p_value"] < ALPHA
                                     for e in students.values() for t in e["paired"][metric]),
                       "worse": sum(t["difference"] < 0 and t["p_value"] < ALPHA
                                    for e in students.values() for t in e["paired"][metric]),
                       "runs": sum(len(e["paired"][metric]) for e in students.values())}
              for metric in PROTOCOL_OF}
    smallest = min(students, key=lambda arch: sizes[arch])
    entry = students[smallest]
    recovery, interval = {}, {}
    for metric in PROTOCOL_OF:
        base, seed = mean(entry["baseline"][metric]), mean(entry["seed"][metric])
        gap = teacher[metric] - base
        recovery[metric] = (seed - base) / gap if gap > 0 else None
        # the spread of the per-seed recoveries, each against its own seed's baseline
        _, low, high = mean_interval(gap_recovery(entry["seed"][metric],
                                                  entry["baseline"][metric], teacher[metric]))
        interval[metric] = [low, high] if gap > 0 and low is not None else None
    return {
        "seed_beats_baseline_significantly_every_seed": beats,
        "mean_gain": gains, "mean_gain_goal": GAIN_GOAL,
        "mean_gain_met": all(g >= GAIN_GOAL for g in gains.values()),
        "teacher_beats_every_student_significantly": teacher_wins,
        "smallest_student": smallest, "smallest_params_millions": round(sizes[smallest] / 1e6, 3),
        "seed_vs_baseline_runs": counts,
        "smallest_recovers": recovery, "smallest_recovers_95ci_over_seeds": interval,
        "recovery_goal": RECOVERY_GOAL,
        "recovery_met": all(r is not None and r >= RECOVERY_GOAL for r in recovery.values()),
    }


def wall_seconds(runs: Path) -> float | None:
    """From the first stage's process start to the last one's end, over every training and
    evaluation metrics file under `runs` (None when they do not all record it). It spans DVC's
    work between the stages, so it is what a user waits; a span across two `dvc repro` sessions
    (a partial re-run) counts the pause between them too."""
    # the stages' metrics files: runs/ARCH/SEED/METHOD/{train,knn,linear}.json (not model.json)
    times = [read_json(path) for path in sorted(runs.glob("*/*/*/*.json"))]
    if not times or any("started_at" not in t or "finished_at" not in t for t in times):
        return None
    return max(t["finished_at"] for t in times) - min(t["started_at"] for t in times)


def stage_seconds(runs: Path) -> float:
    """Summed `seconds` of every training and evaluation stage under `runs`."""
    return sum(float(read_json(path).get("seconds", 0.0))
               for path in sorted(runs.rglob("*.json")))
