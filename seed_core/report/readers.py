"""Readers of what the evaluation and training stages wrote: metrics JSONs, model metadata,
training curves, the stages' wall times. Errors name the file and the stage to run."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

from seed_core.io import read_json

log = logging.getLogger(__name__)

LOG_COLUMNS = ("step", "epoch", "loss", "lr")


def read_metrics(path: str | Path, stage: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the `{stage}` stage first")
    try:
        return read_json(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """A model's metadata sidecar; missing is allowed (shown as unknown in the table).

    A teacher converted from a model pre-trained here names its source file; the source's own
    sidecar supplies `method` and `epochs` when the converted metadata lacks them.
    """
    path = Path(path)
    if not path.is_file():
        log.warning("%s: no model metadata; architecture and method shown as unknown", path)
        return {}
    meta = read_json(path)
    source = meta.get("source_path")
    if "method" not in meta and source and Path(source).with_suffix(".json").is_file():
        origin = read_json(Path(source).with_suffix(".json"))
        meta.update({k: origin[k] for k in ("method", "epochs") if k in origin and k not in meta})
    return meta


def read_training_log(path: str | Path) -> dict[str, list[float]] | None:
    """Columns of a per-step training CSV (`step,epoch,loss,lr[,...]`), or None when the file is
    absent or holds no rows (e.g. an external teacher was not pre-trained here)."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in LOG_COLUMNS if c not in header]
        if header and missing:
            raise ValueError(f"{path}: header {header} lacks columns {missing} "
                             f"(expected {', '.join(LOG_COLUMNS)}, ...)")
        columns: dict[str, list[float]] = {c: [] for c in header}
        for line, row in enumerate(reader, start=2):
            for column in header:
                value = row.get(column)
                try:
                    columns[column].append(float(value) if value not in ("", None) else math.nan)
                except ValueError:
                    raise ValueError(f"{path}:{line}: column '{column}' is not a number: "
                                     f"{value!r}") from None
    if not columns or not columns["step"]:
        return None
    return columns


def stage_seconds(metrics_dir: str | Path,
                  exclude: Sequence[str | Path] = ()) -> dict[str, float]:
    """`{file name: seconds}` of every metrics JSON in `metrics_dir` with a top-level number
    `seconds` (the stages' wall times)."""
    skip = {Path(p).resolve() for p in exclude}
    found: dict[str, float] = {}
    for path in sorted(Path(metrics_dir).glob("*.json")):
        if path.resolve() in skip:
            continue
        try:
            seconds = read_json(path).get("seconds")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            found[path.name] = float(seconds)
    return found




def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_reproduce(obj: Any, where: str) -> dict[str, Any]:
    """`metrics/reproduce.json` checked against issue 11's contract: `{"seconds", "teacher":
    {"arch", "knn_top1", "linear_top1"}, "students": {ARCH: {"seed": {"knn_top1": [...],
    "linear_top1": [...]}, "baseline": {...}}}}`, one value per seed in the same seed order.

    Optional per student: `"paired": {"knn_top1": [...], "linear_top1": [...]}`, one
    `PairedComparison.to_dict()` per seed (that seed's SEED student against that seed's
    baseline, see `seed_core.report.comparisons.seed_tests`).
    """
    def fail(key: str, message: str) -> None:
        raise ValueError(f"{where}: '{key}' {message}")

    if not isinstance(obj, dict):
        fail("(top level)", "must be a JSON object")
    if not _number(obj.get("seconds")):
        fail("seconds", f"must be a number, got {obj.get('seconds')!r}")
    teacher = obj.get("teacher")
    if not isinstance(teacher, dict) or not isinstance(teacher.get("arch"), str):
        fail("teacher", "must be an object with 'arch', 'knn_top1' and 'linear_top1'")
    for metric in ("knn_top1", "linear_top1"):
        if not _number(teacher.get(metric)):
            fail(f"teacher.{metric}", f"must be a percentage, got {teacher.get(metric)!r}")
    students = obj.get("students")
    if not isinstance(students, dict) or not students:
        fail("students", "must be a non-empty object {ARCH: {'seed': ..., 'baseline': ...}}")
    for arch, runs in students.items():
        counts = set()
        for kind in ("seed", "baseline"):
            run = runs.get(kind) if isinstance(runs, dict) else None
            if not isinstance(run, dict):
                fail(f"students.{arch}.{kind}", "is missing")
            for metric in ("knn_top1", "linear_top1"):
                values = run.get(metric)
                if (not isinstance(values, list) or not values
                        or not all(_number(v) and 0 <= v <= 100 for v in values)):
                    fail(f"students.{arch}.{kind}.{metric}",
                         f"must be a non-empty list of percentages, got {values!r}")
                counts.add(len(values))
        for metric, tests in (runs.get("paired") or {}).items():
            if metric not in ("knn_top1", "linear_top1") or not isinstance(tests, list) or not all(
                    isinstance(t, dict) and _number(t.get("p_value"))
                    and _number(t.get("difference")) for t in tests):
                fail(f"students.{arch}.paired.{metric}", "must be a list of paired comparisons "
                     "(p_value, difference, ...) under 'knn_top1' or 'linear_top1'")
            counts.add(len(tests))
        if len(counts) != 1:
            fail(f"students.{arch}", f"lists of different lengths {sorted(counts)}: give one "
                 f"value per seed, the seeds in the same order everywhere")
    return obj
