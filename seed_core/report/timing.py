"""Where a `dvc repro` spends its wall time: the stages' own seconds, their processes' start-up,
and what happens between processes (a process's end after its metrics, DVC hashing and caching
outputs, the training stages' launcher).

Every stage's metrics JSON holds `seconds` (the stage's work), `started_at` (its process's start)
and `finished_at` (when it wrote the metrics), Unix seconds. Sorted by start, consecutive stages
of one `dvc repro` follow each other within seconds; a gap of minutes means the metrics come from
different runs (a partial re-run), and no wall time is claimed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

MAX_GAP_S = 120.0  # between two stages of one `dvc repro`: DVC's work, never minutes


def read_stage_times(metrics_dir: str | Path,
                     exclude: Sequence[str | Path] = ()) -> dict[str, dict[str, float]]:
    """`{stage metrics file name: {started_at, finished_at, seconds}}` for every metrics JSON of
    `metrics_dir` that records all three."""
    skip = {Path(p).resolve() for p in exclude}
    found = {}
    for path in sorted(Path(metrics_dir).glob("*.json")):
        if path.resolve() in skip:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and all(_number(data.get(k)) for k in
                                          ("started_at", "finished_at", "seconds")):
            found[path.name.removesuffix(".json")] = {
                k: float(data[k]) for k in ("started_at", "finished_at", "seconds")}
    return found


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pipeline_timing(times: Mapping[str, Mapping[str, float]],
                    max_gap_s: float = MAX_GAP_S) -> dict[str, Any]:
    """The wall time of the run the stages form, split into the stages' own seconds, process
    start-up (process time outside `seconds`: interpreter, imports, writing) and the time between
    processes; `one_run` is False (and no wall time is given) when two consecutive stages are more
    than `max_gap_s` apart."""
    runs = sorted(times.items(), key=lambda item: item[1]["started_at"])
    if not runs:
        return {"one_run": False, "stages": 0}
    gaps = [(b["started_at"] - a["finished_at"], name_a, name_b)
            for (name_a, a), (name_b, b) in zip(runs, runs[1:])]
    largest = max(gaps, default=(0.0, None, None))
    if largest[0] > max_gap_s:
        return {"one_run": False, "stages": len(runs), "largest_gap_s": round(largest[0], 1),
                "largest_gap_between": [largest[1], largest[2]]}
    wall = max(t["finished_at"] for _, t in runs) - runs[0][1]["started_at"]
    stage = sum(t["seconds"] for _, t in runs)
    process = sum(t["finished_at"] - t["started_at"] for _, t in runs)
    return {"one_run": True, "stages": len(runs), "wall_seconds": round(wall, 1),
            "stage_seconds": round(stage, 1),
            "overhead_seconds": round(wall - stage, 1),
            "startup_seconds": round(process - stage, 1),
            "between_stages_seconds": round(wall - process, 1),
            "largest_gap_s": round(largest[0], 1)}


def timing_sentence(timing: Mapping[str, Any]) -> str:
    """One paragraph for the report and the README."""
    if not timing.get("one_run"):
        if not timing.get("stages"):
            return "No stage recorded its start and end: no wall time."
        return (f"The stages' metrics come from more than one run (a gap of "
                f"{timing['largest_gap_s']:.0f} s between `{timing['largest_gap_between'][0]}` "
                f"and `{timing['largest_gap_between'][1]}`): no wall time is claimed.")
    return (f"Wall time of the run, from the first stage's process start to the report: "
            f"{timing['wall_seconds']:.0f} s ({timing['wall_seconds'] / 60:.1f} min) for "
            f"{timing['stages']} stages: {timing['stage_seconds']:.0f} s inside the stages, "
            f"{timing['overhead_seconds']:.0f} s of overhead ({timing['startup_seconds']:.0f} s of "
            f"process start-up: Python, imports, writing outputs; "
            f"{timing['between_stages_seconds']:.0f} s between processes: each process's end "
            f"after its metrics, DVC hashing and caching outputs, the training stages' "
            f"launcher). DVC's own start before the first stage and its final bookkeeping after "
            f"the report are not included.")
