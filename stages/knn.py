"""Stage `knn`: weighted kNN accuracy (InstDisc / DINO protocol) of one model's cached features.

Hyper-parameter hygiene: a class-balanced holdout split is carved out of train; every (k, T) of
({knn.k} + knn.sweep_k) x ({knn.temperature} + knn.sweep_temperature) is scored on it with the
rest of train as the bank, and the best is kept (ties go to the configured pair). The test (val
split) is then scored once with that (k, T) and the full train as the bank; `--predictions`
saves its per-sample predictions for the report's paired tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import program
from seed_core.config import Params, check_knn_bank
from seed_core.evaluation.features import feature_num_classes, load_feature_split
from seed_core.evaluation.knn import knn_neighbors, knn_vote
from seed_core.evaluation.metrics import nan_to_none, per_class_accuracy, topk_accuracy
from seed_core.evaluation.predictions import save_predictions
from seed_core.evaluation.selection import SELECT_ALPHA, grid_key, knn_grid, select_knn
from seed_core.evaluation.splits import holdout_split
from seed_core.launch import stage
from seed_core.stagekit import add_params_arguments
from seed_core.tracking import flatten_metrics

log = logging.getLogger("knn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True,
                        help="directory written by stages/features.py")
    parser.add_argument("--name", required=True, help="model name (teacher, baseline, student)")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--predictions", default=None,
                        help="per-sample test predictions (safetensors: index, label, prediction)")
    add_params_arguments(parser)
    return parser.parse_args(argv)


def evaluate(features_dir: str, name: str, params: Params, device: torch.device,
             predictions_path: str | None = None) -> dict[str, Any]:
    cfg = params.knn
    train = load_feature_split(features_dir, "train")
    val = load_feature_split(features_dir, "val")
    num_classes = feature_num_classes(features_dir, train["labels"], val["labels"])
    x, y = train["features"], train["labels"]

    fit, hold = holdout_split(y, params.data.holdout_fraction, params.data.seed)
    # the configured k must fit the bank; sweep values above it are left out of the grid
    check_knn_bank([cfg.k], int(fit.numel()), f"{features_dir}/train.safetensors")
    ks, temperatures = knn_grid(cfg.k, cfg.temperature, cfg.sweep_k, cfg.sweep_temperature,
                                fit.numel())
    chosen = select_knn(x[fit], y[fit], x[hold].to(device), y[hold], ks, temperatures,
                        (cfg.k, cfg.temperature), num_classes)
    k, t = chosen.k, chosen.temperature
    log.info("%s holdout (%d queries, bank %d): k=%d, T=%g chosen (top-1 %.2f%%; configured "
             "k=%d, T=%g: %.2f%%; grid best k=%d, T=%g: %.2f%%, one-sided McNemar p vs "
             "configured %s)", name, hold.numel(), fit.numel(), k, t, chosen.top1, cfg.k,
             cfg.temperature, chosen.grid_top1[(cfg.k, cfg.temperature)], *chosen.best,
             chosen.grid_top1[chosen.best],
             "-" if chosen.p_value is None else f"{chosen.p_value:.3g}")
    for what, edge in (("k", chosen.k_edge), ("T", chosen.temperature_edge)):
        if edge:
            log.warning("%s: the chosen %s is the %s of its grid; the optimum may lie beyond it",
                        name, what, edge)
    # top-5 of the chosen pair on the holdout, from the same bank
    sims, idx = knn_neighbors(x[fit], x[hold].to(device), k)
    holdout = topk_accuracy(knn_vote(sims, y[fit].to(idx.device)[idx], t, num_classes), y[hold])

    # the test split, scored once with the chosen (k, T) and the full train as the bank
    sims, idx = knn_neighbors(x, val["features"].to(device), k)
    scores = knn_vote(sims, y.to(idx.device)[idx], t, num_classes).cpu()
    test = topk_accuracy(scores, val["labels"])
    prediction = scores.argmax(1)
    per_class = per_class_accuracy(prediction, val["labels"], num_classes)
    log.info("%s test (%d images): top-1 %.2f%%, top-5 %.2f%%", name, val["labels"].numel(),
             test["top1"], test["top5"])
    if predictions_path:
        save_predictions(predictions_path, val["index"], val["labels"], prediction,
                         {"protocol": "knn", "name": name, "k": str(k), "temperature": f"{t:g}"})
    sweep = {str(kk): chosen.grid_top1[(kk, t)] for kk in ks}
    return {"name": name, "k": k, "temperature": t, "selected_on": "holdout",
            "configured": {"k": cfg.k, "temperature": cfg.temperature},
            "holdout": {**holdout, "samples": int(hold.numel()), "bank": int(fit.numel()),
                        "grid_k": ks, "grid_temperature": temperatures,
                        "k_edge": chosen.k_edge, "temperature_edge": chosen.temperature_edge,
                        "best": grid_key(*chosen.best), "best_p_value": chosen.p_value,
                        "rule": f"the configured (k, T) unless the best beats it by a one-sided "
                                f"McNemar test on the holdout, p < {SELECT_ALPHA:g}",
                        "sweep_top1": sweep,
                        "grid_top1": {grid_key(kk, tt): v
                                      for (kk, tt), v in chosen.grid_top1.items()}},
            "test": test, "per_class_top1": nan_to_none(per_class)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stage(f"knn@{args.name}", args.params, args.overrides) as ctx:
        if not ctx.runtime.is_main:
            return  # a single-process stage; extra torchrun ranks have nothing to do
        summary = ctx.finish(args.metrics, evaluate(args.features, args.name, ctx.params,
                                                    ctx.runtime.device, args.predictions))
        ctx.tracker.log_metrics(flatten_metrics(summary))


if __name__ == "__main__":
    program.run(main)
