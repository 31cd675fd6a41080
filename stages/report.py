"""Stage `report`: the results table (teacher / baseline / SEED), plots and the summary metrics.

Writes `metrics/summary.json` (`{"teacher": {"knn_top1", "knn_top5", "linear_top1",
"linear_top5"}, "baseline": {...}, "student": {...}}`, test-split percentages),
`metrics/headline/{teacher,baseline,student,seed_minus_baseline}.json` (test and holdout
top-1 per model, training seconds, SEED − baseline with p: what runs are compared by and
`dvc metrics show` lists, one row per file, see `seed_core.report.tables.headline_rows`),
`metrics/paired.json` (the paired tests of every model pair on the same test images, from the
kNN / linear stages' per-sample predictions: `{protocol: {pair: comparison}}`),
`reports/summary.md`, and `plots/{training_curves,per_class_accuracy,embedding_projection}.png`;
logs the summary and the paired tests to the pipeline's parent MLflow run and the files as the
report run's artifacts. With `--reproduce FILE` (the `make reproduce` results) the report adds
the students' table over seeds.
"""

from __future__ import annotations

import argparse
import logging
import time
import sys
from pathlib import Path
from typing import Any

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import program
from seed_core.config import Params
from seed_core.data.shardset import open_shards
from seed_core.evaluation.features import load_feature_split
from seed_core.io import read_json, write_json, write_text
from seed_core.launch import stage
from seed_core.report.comparisons import paired_metrics, paired_tests
from seed_core.report.plots import (pca_2d, plot_embeddings, plot_per_class, plot_training_curves,
                                   relative_to, subsample)
from seed_core.report.prose import ReadingContext, render_summary_md
from seed_core.report.readers import (check_reproduce, read_metrics, read_model_meta,
                                      read_training_log, stage_seconds)
from seed_core.report.tables import (MODELS, PROTOCOLS, build_summary, headline_rows,
                                     seeds_table, summary_metrics)
from seed_core.report.timing import pipeline_timing, read_stage_times, timing_sentence
from seed_core.stagekit import add_params_arguments, process_started_at
from seed_core.tracking import Tracker

log = logging.getLogger("report")
MAX_POINTS = 2000  # points per panel of the embedding projection


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="reports")
    p.add_argument("--plots-dir", default="plots")
    p.add_argument("--summary", default="metrics/summary.json")
    p.add_argument("--headline-dir", default="metrics/headline",
                   help="output: the headline rows, one JSON file each (see dvc.yaml)")
    add_params_arguments(p)
    p.add_argument("--metrics-dir", default="metrics",
                   help="stage metrics JSONs whose `seconds` sum to the pipeline compute time")
    p.add_argument("--teacher-meta", default="models/teacher/teacher.json")
    p.add_argument("--baseline-meta", default="models/pretrain/baseline/model.json")
    p.add_argument("--student-meta", default="models/student/model.json")
    for model in MODELS:
        p.add_argument(f"--knn-{model}", default=f"metrics/knn_{model}.json")
        p.add_argument(f"--linear-{model}", default=f"metrics/linear_{model}.json")
        for protocol in PROTOCOLS:
            p.add_argument(f"--{protocol}-{model}-predictions",
                           default=f"data/predictions/{protocol}_{model}.safetensors")
    p.add_argument("--paired", default="metrics/paired.json",
                   help="output: the paired tests of every model pair")
    p.add_argument("--pipeline", default="metrics/pipeline.json",
                   help="output: the run's wall time, stage seconds and overhead")
    p.add_argument("--reproduce", default=None,
                   help="metrics/reproduce.json of `make reproduce`: adds the table over seeds")
    p.add_argument("--teacher-features", default="data/features/teacher/val.safetensors")
    p.add_argument("--student-features", default="data/features/student/val.safetensors")
    p.add_argument("--log-teacher", default="plots/pretrain_teacher.csv")
    p.add_argument("--log-baseline", default="plots/pretrain_baseline.csv")
    p.add_argument("--log-distill", default="plots/distill.csv")
    p.add_argument("--val-shards", default=None, help="val shards (class names from manifest)")
    return p.parse_args(argv)


def class_names(args: argparse.Namespace) -> list[str] | None:
    if args.val_shards:
        names = open_shards(args.val_shards).class_names
        if names:
            return list(names)
    meta_path = Path(args.student_features).parent / "meta.json"
    return read_json(meta_path).get("class_names") if meta_path.is_file() else None


def projection_panels(args: argparse.Namespace, seed: int) -> tuple[dict[str, Any], int]:
    """PCA panels of teacher and student val features on the same subsample, and the number of
    val images. The embeddings (head outputs, the space SEED aligns) are used when both have
    them, else the backbone features."""
    splits = {name: load_feature_split(Path(path).parent, Path(path).stem)
              for name, path in (("teacher", args.teacher_features),
                                 ("student", args.student_features))}
    teacher, student = splits["teacher"], splits["student"]
    if not teacher["index"].equal(student["index"]):
        raise ValueError(f"{args.teacher_features} and {args.student_features} hold different "
                         f"samples; extract both from the same val shards")
    key = "embeddings" if all("embeddings" in s for s in splits.values()) else "features"
    rows = subsample(teacher["index"].numel(), MAX_POINTS, seed)
    panels = {}
    for name, split in splits.items():
        xy, ratio = pca_2d(split[key][rows])
        panels[f"{name}: {key} (PCA, {rows.numel()} val images)"] = (xy, split["labels"][rows],
                                                                     ratio)
    return panels, int(teacher["index"].numel())


def prediction_files(args: argparse.Namespace) -> dict[str, dict[str, Path]]:
    """`{protocol: {model: file}}` for the protocols whose three prediction files all exist."""
    found: dict[str, dict[str, Path]] = {}
    for protocol in PROTOCOLS:
        files = {m: Path(getattr(args, f"{protocol}_{m}_predictions")) for m in MODELS}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            log.warning("%s: no paired %s tests; missing prediction files %s (run the %s stages "
                        "with --predictions)", args.paired, protocol, missing, protocol)
        else:
            found[protocol] = files
    return found


def reading_context(params: Params, metas: dict[str, dict],
                    n_test: int) -> ReadingContext:
    return ReadingContext(
        n_test=n_test, image_size=params.data.image_size,
        teacher_arch=metas["teacher"].get("arch", params.teacher.arch),
        student_arch=metas["student"].get("arch", params.student.arch),
        teacher_small_images=bool(metas["teacher"].get("small_images",
                                                       params.teacher.small_images)),
        student_small_images=bool(metas["student"].get("small_images",
                                                       params.student.small_images)),
        teacher_epochs=metas["teacher"].get("epochs"),
        baseline_epochs=metas["baseline"].get("epochs"),
        distill_epochs=params.distill.epochs)


def build(args: argparse.Namespace, params: Params, tracker: Tracker) -> dict[str, Any]:
    started = time.perf_counter()
    metas = {m: read_model_meta(getattr(args, f"{m}_meta")) for m in MODELS}
    knn = {m: read_metrics(getattr(args, f"knn_{m}"), f"knn@{m}") for m in MODELS}
    linear = {m: read_metrics(getattr(args, f"linear_{m}"), f"linear@{m}")
              for m in MODELS}
    summary = build_summary(knn, linear)
    names = class_names(args)
    plots_dir, out_dir = Path(args.plots_dir), Path(args.out_dir)
    plots = {"training curves": plots_dir / "training_curves.png",
             "per-class accuracy": plots_dir / "per_class_accuracy.png",
             "embedding projection": plots_dir / "embedding_projection.png"}

    logs = {"teacher pre-training": read_training_log(args.log_teacher),
            "baseline pre-training": read_training_log(args.log_baseline),
            "distillation": read_training_log(args.log_distill)}
    plot_training_curves(logs, plots["training curves"])
    plot_per_class({kind: {m: metrics[m].get("per_class_top1", []) for m in MODELS}
                           for kind, metrics in (("kNN", knn), ("linear", linear))},
                          names, plots["per-class accuracy"])
    panels, n_test = projection_panels(args, params.data.seed)
    plot_embeddings(panels, names, plots["embedding projection"])

    paired = paired_tests(prediction_files(args))
    seeds_md = None
    if args.reproduce:
        seeds_md = seeds_table(check_reproduce(read_metrics(args.reproduce, "make reproduce"),
                                               args.reproduce))
    not_stages = [args.summary, args.paired, args.pipeline,
                  Path(args.metrics_dir) / "reproduce.json"]
    seconds = stage_seconds(args.metrics_dir, exclude=not_stages)
    # this stage's own times: it is the last stage of the run
    times = {**read_stage_times(args.metrics_dir, exclude=not_stages),
             "report": {"started_at": process_started_at(), "finished_at": time.time(),
                        "seconds": time.perf_counter() - started}}
    timing = pipeline_timing(times)
    markdown = render_summary_md(
        summary, metas, knn, linear, reading_context(params, metas, n_test),
        params.data.holdout_fraction, seconds,
        {caption: relative_to(path, out_dir) for caption, path in plots.items()}, paired,
        seeds_md, timing_sentence(timing))
    write_json(args.pipeline, timing)
    write_json(args.paired, paired)
    write_json(args.summary, summary)
    for name, row in headline_rows(knn, linear, paired, seconds).items():
        write_json(Path(args.headline_dir) / f"{name}.json", row)
    write_text(out_dir / "summary.md", markdown)
    log.info("summary: %s", summary)

    headline = {**summary_metrics(summary), **paired_metrics(paired)}
    tracker.log_parent_metrics(headline)
    tracker.log_metrics({**headline, "pipeline_seconds": sum(seconds.values())})
    # on the parent too: MLflow's compare view shows the artifacts that the compared runs share
    for path in [*plots.values(), out_dir / "summary.md"]:
        tracker.log_artifact(path)
        tracker.log_parent_artifact(path)
    tracker.note_reused_stages({name: t["finished_at"] for name, t in times.items()})
    if params.mlflow.registered_model:
        tracker.tag_model_version(params.mlflow.registered_model, summary_metrics(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stage("report", args.params, args.overrides) as ctx:
        if ctx.runtime.is_main:
            build(args, ctx.params, ctx.tracker)


if __name__ == "__main__":
    program.run(main)
