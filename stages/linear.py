"""Stage `linear`: linear-probe accuracy of one frozen model (MoCo protocol), any timm arch.

`linear.mode: cached` trains the classifier on the cached backbone features; `augmented` runs
MoCo's protocol through the frozen backbone in eval mode (RandomResizedCrop + flip, fresh every
epoch). Either way the lr is picked from `linear.lrs` by training on the fit part of a
class-balanced holdout split of train and scoring its holdout part (cached eval-transform
features); the classifier is then retrained on the full train at that lr and the test (val
split, cached eval-transform features) is scored once. A best lr at either end of `linear.lrs`
is flagged (`holdout.lr_edge`): the optimum may lie beyond the grid. `--predictions` saves the
test's per-sample predictions for the report's paired tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import program
from seed_core.config import Params
from seed_core.data.loader import training_batches
from seed_core.data.shardset import ShardSet, open_shards
from seed_core.data.transforms import linear_train_transform
from seed_core.evaluation.features import feature_num_classes, load_feature_split
from seed_core.evaluation.linear import fit_linear, predict_linear, select_lr, train_linear
from seed_core.evaluation.metrics import nan_to_none, per_class_accuracy, topk_accuracy
from seed_core.evaluation.predictions import save_predictions
from seed_core.evaluation.splits import holdout_split
from seed_core.launch import stage
from seed_core.precision import autocast, channels_last, resolve, to_device
from seed_core.stagekit import add_params_arguments
from seed_core.tracking import curve_metrics, flatten_metrics
from seed_core.tracking import Tracker

log = logging.getLogger("linear")

Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="model name (teacher, baseline, student)")
    parser.add_argument("--features", required=True,
                        help="directory written by stages/features.py for this model")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--model", default=None, help="canonical model (augmented mode)")
    parser.add_argument("--train-shards", default=None, help="train shards (augmented mode)")
    parser.add_argument("--val-shards", default=None,
                        help="val shards (checked against the cached val features)")
    parser.add_argument("--predictions", default=None,
                        help="per-sample test predictions (safetensors: index, label, prediction)")
    add_params_arguments(parser)
    return parser.parse_args(argv)


# ------------------------------------------------------------------ augmented mode


def augmented_batches(encoder: nn.Module, shards: ShardSet, params: Params,
                      device: torch.device, subset: np.ndarray,
                      precision: str = "fp32") -> Batches:
    """`batches(epoch)`: frozen-backbone features of fresh RandomResizedCrop + flip views of
    the samples `subset` (global sample indices), one pass per epoch."""
    cfg, data = params.linear, params.data
    if len(subset) < cfg.batch_size:
        raise ValueError(f"{len(subset)} training samples cannot fill one batch of "
                         f"linear.batch_size={cfg.batch_size}")
    transform = linear_train_transform(data.image_size)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = training_batches(shards, transform, cfg.batch_size, seed=cfg.seed, rank=0,
                                  world_size=1, start=(epoch, 0), stop=(epoch + 1, 0),
                                  workers=data.workers, subset=subset)
        for batch in loader:
            with torch.no_grad(), autocast(device, precision):
                feats = encoder.features(to_device(batch["image"], device))
            yield feats.float(), batch["label"]

    return batches


def augmented_trainer(args: argparse.Namespace, params: Params, device: torch.device,
                      train: dict[str, torch.Tensor], fit: torch.Tensor, num_classes: int,
                      tracker: Tracker) -> Callable[[float, bool], nn.Module]:
    if not (args.model and args.train_shards):
        raise ValueError("linear.mode 'augmented' needs --model and --train-shards")
    # imported here: the model code pulls in timm and torchvision (~1.5 s of start-up), which
    # the default cached mode, a probe on stored features, never needs
    from seed_core.teachers.canonical import load_canonical

    encoder, _ = load_canonical(args.model, device=device)
    channels_last(encoder.eval().requires_grad_(False))
    precision = resolve(params.features.precision, device, encoder)
    shards = open_shards(args.train_shards)
    with torch.no_grad():
        width = encoder.features(torch.zeros(1, 3, params.data.image_size,
                                             params.data.image_size, device=device)).shape[1]
    if width != train["features"].shape[1]:
        raise ValueError(f"{args.model} gives {width} features per image but the cached "
                         f"features in {args.features} have {train['features'].shape[1]}")
    everything = np.arange(shards.samples)
    # the probe trained for lr selection never sees the holdout images
    fit_samples = train["index"][fit].numpy()
    cfg = params.linear

    def train_fn(lr: float, full: bool) -> nn.Module:
        source = augmented_batches(encoder, shards, params, device,
                                   everything if full else fit_samples, precision)
        return fit_linear(source, width, num_classes, cfg.epochs, lr, cfg.momentum,
                          cfg.weight_decay, cfg.seed, device, on_epoch=epoch_logger(
                              tracker, f"{'final' if full else f'lr_{lr:g}'}.loss"))

    return train_fn


# ------------------------------------------------------------------ both modes


def epoch_logger(tracker: Tracker, key: str) -> Callable[[int, float], None]:
    def on_epoch(epoch: int, loss: float) -> None:
        tracker.log_metrics(curve_metrics({key: loss}), step=epoch)
        log.debug("%s epoch %d: %.4f", key, epoch, loss)  # the lr's line: its holdout top-1
    return on_epoch


def cached_trainer(params: Params, device: torch.device, train: dict[str, torch.Tensor],
                   fit: torch.Tensor, num_classes: int,
                   tracker: Tracker) -> Callable[[float, bool], nn.Module]:
    cfg = params.linear

    def train_fn(lr: float, full: bool) -> nn.Module:
        rows = slice(None) if full else fit
        return train_linear(train["features"][rows], train["labels"][rows], num_classes,
                            cfg.epochs, lr, cfg.batch_size, cfg.momentum, cfg.weight_decay,
                            cfg.seed, device, on_epoch=epoch_logger(
                                tracker, f"{'final' if full else f'lr_{lr:g}'}.loss"))

    return train_fn


def evaluate(args: argparse.Namespace, params: Params, device: torch.device,
             tracker: Tracker) -> dict[str, Any]:
    cfg = params.linear
    train = load_feature_split(args.features, "train")
    val = load_feature_split(args.features, "val")
    if args.val_shards and open_shards(args.val_shards).samples < val["labels"].numel():
        raise ValueError(f"{args.features}: more cached val features than samples in "
                         f"{args.val_shards}; the features were made from other shards")
    num_classes = feature_num_classes(args.features, train["labels"], val["labels"])
    fit, hold = holdout_split(train["labels"], params.data.holdout_fraction, params.data.seed)
    if cfg.mode == "cached":
        train_fn = cached_trainer(params, device, train, fit, num_classes, tracker)
    else:
        train_fn = augmented_trainer(args, params, device, train, fit, num_classes, tracker)

    selection = select_lr(cfg.lrs, lambda lr: train_fn(lr, False), train["features"][hold],
                          train["labels"][hold])
    log.info("%s: lr %g chosen on holdout (top-1 per lr: %s)", args.name, selection.best_lr,
             ", ".join(f"{lr:g}: {top1:.2f}%" for lr, top1 in selection.lr_top1.items()))
    # retrained on the whole train split at the chosen lr; the test split is scored once
    final = train_fn(selection.best_lr, True)
    scores = predict_linear(final, val["features"])
    test = topk_accuracy(scores, val["labels"])
    prediction = scores.argmax(1)
    per_class = per_class_accuracy(prediction, val["labels"], num_classes)
    log.info("%s test: top-1 %.2f%%, top-5 %.2f%%", args.name, test["top1"], test["top5"])
    if args.predictions:
        save_predictions(args.predictions, val["index"], val["labels"], prediction,
                         {"protocol": "linear", "name": args.name,
                          "lr": f"{selection.best_lr:g}"})
    return {"name": args.name, "mode": cfg.mode, "epochs": cfg.epochs, "lr": selection.best_lr,
            "selected_on": "holdout",
            "holdout": {**selection.holdout, "lr_edge": selection.edge,
                        "lr_top1": {f"{lr:g}": top1 for lr, top1 in selection.lr_top1.items()}},
            "test": test, "per_class_top1": nan_to_none(per_class)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stage(f"linear@{args.name}", args.params, args.overrides) as ctx:
        if ctx.runtime.world_size > 1:
            raise RuntimeError("stages/linear.py runs in one process; start it with python, "
                               "not torchrun")
        summary = ctx.finish(args.metrics, evaluate(args, ctx.params, ctx.runtime.device,
                                                    ctx.tracker))
        ctx.tracker.log_metrics(flatten_metrics(summary))


if __name__ == "__main__":
    program.run(main)
