"""Stage `reproduce` (in `reproduce/dvc.yaml`): the summary of `make reproduce`.

Reads every student's baseline and SEED runs over `reproduce.seeds` (their kNN / linear metrics
and per-sample predictions), the teacher's metrics and predictions from the main pipeline, and
writes `metrics/reproduce.json`: `{"seconds", "teacher": {"arch", "knn_top1", "linear_top1"},
"students": {ARCH: {"seed": {"knn_top1": [per seed], "linear_top1": [...]}, "baseline": {...},
"paired": ..., "teacher_vs_seed": ...}}, "seeds", "goals"}` (percentages; seeds in the same order
in every list), and `reports/reproduce.md`, the table with the paired tests.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from safetensors import safe_open

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import program
from seed_core.io import read_json, write_json, write_text
from seed_core.launch import stage
from seed_core.report.readers import check_reproduce
from seed_core.report.reproduce import check_goals, gather, stage_seconds, wall_seconds
from seed_core.report.tables import seeds_table
from seed_core.stagekit import add_params_arguments

log = logging.getLogger("reproduce")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="RUNS/<arch>/<seed>/<method>/ directories")
    parser.add_argument("--teacher-meta", default="models/teacher/teacher.json")
    parser.add_argument("--teacher-knn", default="metrics/knn_teacher.json")
    parser.add_argument("--teacher-linear", default="metrics/linear_teacher.json")
    parser.add_argument("--teacher-predictions", default="data/predictions",
                        help="directory with knn_teacher / linear_teacher .safetensors")
    parser.add_argument("--out", default="metrics/reproduce.json")
    parser.add_argument("--report", default="reports/reproduce.md")
    add_params_arguments(parser)
    return parser.parse_args(argv)


def backbone_parameters(model_file: Path) -> int:
    """Learnt parameters of a canonical model's backbone, from its safetensors header."""
    with safe_open(str(model_file), framework="pt") as f:
        shapes = [f.get_slice(key).get_shape() for key in f.keys()
                  if key.startswith("backbone.") and not key.endswith(
                      ("running_mean", "running_var", "num_batches_tracked"))]
    return sum(math.prod(shape) for shape in shapes)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stage("reproduce", args.params, args.overrides) as ctx:
        cfg, runs = ctx.params.reproduce, Path(args.runs)
        teacher_meta = read_json(args.teacher_meta)
        teacher = {"arch": teacher_meta["arch"],
                   "knn_top1": read_json(args.teacher_knn)["test"]["top1"],
                   "linear_top1": read_json(args.teacher_linear)["test"]["top1"]}
        predictions = {protocol: Path(args.teacher_predictions) / f"{protocol}_teacher.safetensors"
                       for protocol in ("knn", "linear")}
        result = gather(runs, cfg.students, cfg.seeds, teacher, predictions)
        sizes = {arch: backbone_parameters(runs / arch / str(cfg.seeds[0]) / "seed" / "model" /
                                           "model.safetensors") for arch in cfg.students}
        result["goals"] = check_goals(result, sizes)
        wall = wall_seconds(runs)
        result = {"seconds": round(stage_seconds(runs) + ctx.seconds, 1),
                  **({"wall_seconds": round(wall + ctx.seconds, 1)} if wall else {}), **result}
        check_reproduce(result, args.out)  # the contract, before anything is written
        write_json(args.out, result)
        write_text(args.report, "# make reproduce: students over seeds\n\n"
                   + seeds_table(result) + "\n")
        log.info("goals: %s", result["goals"])


if __name__ == "__main__":
    program.run(main)
