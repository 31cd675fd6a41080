"""Stage `knn`: weighted kNN accuracy (InstDisc / DINO protocol) of one model's cached features.

Hyper-parameter hygiene: a class-balanced holdout split is carved out of train; the configured
(k, T) and every k of `knn.sweep_k` are scored on it with the rest of train as the bank (for
tuning). The test (val split) accuracy is then computed once, with the full train as the bank.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from seed_core.config import Params
from seed_core.evaluation.features import feature_num_classes, load_feature_split
from seed_core.evaluation.knn import knn_classify, knn_neighbors, knn_vote
from seed_core.evaluation.metrics import nan_to_none, per_class_accuracy, topk_accuracy
from seed_core.evaluation.splits import holdout_split
from seed_core.stagekit import stage
from seed_core.tracking import flatten_metrics

log = logging.getLogger("knn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True,
                        help="directory written by stages/features.py")
    parser.add_argument("--name", required=True, help="model name (teacher, baseline, student)")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def evaluate(features_dir: str, name: str, params: Params,
             device: torch.device) -> dict[str, Any]:
    cfg = params.knn
    train = load_feature_split(features_dir, "train")
    val = load_feature_split(features_dir, "val")
    num_classes = feature_num_classes(features_dir, train["labels"], val["labels"])
    x, y = train["features"], train["labels"]

    fit, hold = holdout_split(y, params.data.holdout_fraction, params.data.seed)
    ks = sorted({cfg.k, *cfg.sweep_k})
    # neighbours for the largest k once; every smaller k votes with a prefix of them
    sims, idx = knn_neighbors(x[fit], x[hold].to(device), max(ks))
    neighbor_labels = y[fit].to(device)[idx]
    hold_y = y[hold]

    def holdout_scores(k: int) -> torch.Tensor:
        return knn_vote(sims[:, :k], neighbor_labels[:, :k], cfg.temperature, num_classes)

    holdout = topk_accuracy(holdout_scores(cfg.k), hold_y)
    sweep = {str(k): topk_accuracy(holdout_scores(k), hold_y, ks=(1,))["top1"]
             for k in cfg.sweep_k}
    log.info("%s holdout (%d queries, bank %d): top-1 %.2f%% at k=%d; sweep %s", name,
             hold.numel(), fit.numel(), holdout["top1"], cfg.k, sweep)

    # the test split, scored once with the configured (k, T) and the full train as bank
    scores = knn_classify(x, y, val["features"].to(device), cfg.k, cfg.temperature, num_classes)
    test = topk_accuracy(scores, val["labels"])
    per_class = per_class_accuracy(scores.argmax(1).cpu(), val["labels"], num_classes)
    log.info("%s test (%d images): top-1 %.2f%%, top-5 %.2f%%", name, val["labels"].numel(),
             test["top1"], test["top5"])
    return {"name": name, "k": cfg.k, "temperature": cfg.temperature,
            "holdout": {**holdout, "sweep_top1": sweep}, "test": test,
            "per_class_top1": nan_to_none(per_class)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stage(f"knn@{args.name}", args.params) as ctx:
        if not ctx.runtime.is_main:
            return  # a single-process stage; extra torchrun ranks have nothing to do
        summary = ctx.finish(args.metrics, evaluate(args.features, args.name, ctx.params,
                                                    ctx.runtime.device))
        ctx.tracker.log_metrics(flatten_metrics(summary))


if __name__ == "__main__":
    main()
