"""The small-views hypotheses (issue 17): why SEED's two 16-px views lose points at 32 px.

    python -m seed_core.report.small_views --model default=models/student \\
        --model small-views-2=/path/to/its/student --model teacher=models/teacher \\
        --out metrics/small_views.json --readme README.md

Two explanations besides "a 16-px patch holds too little", each measured on every `--model`
by kNN top-1 (the configured k and T) on the holdout split of the training shards, the split
the settings are chosen on (the test split is not read):

- **BatchNorm statistics** (hypothesis 1). A student trained with small views updates its
  BatchNorm running statistics on 32-px and 16-px passes alike. `bn_recomputed` recomputes every
  BatchNorm's statistics on the fit part of train at 32 px (a cumulative average over the
  evaluation view, as after training), then extracts features again. If the patches spoilt the
  statistics, this recovers what `as_trained` lost; on a student trained without small views it
  should move little (the control).
- **1×1 maps** (hypothesis 2). At 16 px a stride-32 network's last stage sees a 1×1 map (and the
  one before it 1×1 or 2×2). `at_16px` feeds the images downsampled to 16 px; `at_16px_upsampled`
  feeds the same 16-px images upsampled back to 32 px: the same information, at the resolution
  the network was made for. Their difference is what the small maps cost apart from content;
  `as_trained` minus `at_16px_upsampled` is what 16 px of content costs.

The README's section between its small-views markers is rendered from `--out`'s JSON.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from seed_core import distributed
from seed_core.config import load_params
from seed_core.data.loader import eval_loader
from seed_core.data.shardset import open_shards
from seed_core.data.transforms import eval_transform
from seed_core.evaluation.extract import extract_split
from seed_core.evaluation.knn import knn_classify
from seed_core.evaluation.metrics import topk_accuracy
from seed_core.evaluation.splits import holdout_split
from seed_core.io import read_json, write_json
from seed_core.precision import resolve, to_device
from seed_core.report.sections import refresh_section
from seed_core.teachers.canonical import load_canonical

log = logging.getLogger("small_views")
BEGIN, END = "<!-- small-views: begin -->", "<!-- small-views: end -->"
SMALL = 16  # SEED's small-view size here (distill.small_size of the experiment)
COLUMNS = ("as_trained", "bn_recomputed", "at_16px", "at_16px_upsampled")


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, forward: Callable[[torch.Tensor], Any],
                            batches: Iterable[torch.Tensor]) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them over `batches` (a
    cumulative average: `momentum=None`), the rest of `model` in eval mode; returns the number
    of images seen. Leaves `model` in eval mode with the BatchNorms' momenta restored."""
    norms = batchnorms(model)
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.eval()
    for norm in norms:
        norm.train()
    seen = 0
    try:
        for images in batches:
            forward(images)
            seen += int(images.shape[0])
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    if norms and not seen:
        raise ValueError("no image to recompute the BatchNorm statistics on")
    return seen


def resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear with antialiasing (a downsample that averages, as a resize of the photo would)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


def knn_holdout_top1(features: torch.Tensor, labels: torch.Tensor, fit: torch.Tensor,
                     hold: torch.Tensor, k: int, temperature: float, classes: int) -> float:
    scores = knn_classify(features[fit], labels[fit], features[hold], k, temperature, classes)
    return topk_accuracy(scores, labels[hold])["top1"]


def measure(model_dir: str, shards_dir: str, params_file: str) -> dict[str, Any]:
    """The four kNN holdout top-1s of one canonical model (see the module's docstring)."""
    params = load_params(params_file)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runtime = distributed.Runtime(rank=0, world_size=1, local_rank=0, device=device)
    shards = open_shards(shards_dir)
    transform = eval_transform(params.data.image_size)
    encoder, meta = load_canonical(model_dir, device=device)
    size = params.data.image_size

    # the features stage's precision (features.precision), so that `as_trained` is the kNN
    # stage's holdout grid value at the configured (k, T)
    precision = resolve(params.features.precision, runtime.device, encoder)

    def features(fn: Callable[[torch.Tensor], torch.Tensor], desc: str):
        return extract_split(fn, shards, transform, params.features.batch_size, 0, precision,
                             runtime, desc)

    started = time.perf_counter()
    base = features(encoder.features, "as trained")
    labels = base.labels
    fit, hold = holdout_split(labels, params.data.holdout_fraction, params.data.seed)
    classes = int(labels.max()) + 1
    k, temperature = params.knn.k, params.knn.temperature

    def top1(split_features) -> float:
        return round(knn_holdout_top1(split_features.features, labels, fit, hold, k,
                                      temperature, classes), 2)

    result = {"as_trained": top1(base)}
    result["at_16px"] = top1(features(lambda x: encoder.features(resized(x, SMALL)), "16 px"))
    result["at_16px_upsampled"] = top1(features(
        lambda x: encoder.features(resized(resized(x, SMALL), size)), "16 px upsampled"))
    fit_set = set(base.index[fit].tolist())

    def fit_batches() -> Iterable[torch.Tensor]:
        for batch in eval_loader(shards, transform, params.features.batch_size):
            keep = torch.tensor([int(i) in fit_set for i in batch["index"]])
            if keep.any():
                yield to_device(batch["image"][keep], runtime.device)

    result["bn_recomputed"] = None
    if batchnorms(encoder):
        result["bn_images"] = recompute_bn_statistics(encoder, encoder.features, fit_batches())
        result["bn_recomputed"] = top1(features(encoder.features, "BN recomputed"))
    return {"model": str(model_dir), "arch": meta.get("arch"), **result, "k": k,
            "temperature": temperature, "precision": precision, "holdout_samples": int(hold.numel()),
            "seconds": round(time.perf_counter() - started, 1)}


def _cell(value: float | None, base: float) -> str:
    return "–" if value is None else f"{value:.2f} ({value - base:+.2f})"


def section(results: Mapping[str, Mapping[str, Any]]) -> str:
    rows = ["| model | arch | as trained | BN recomputed at 32 px | at 16 px | 16 px upsampled "
            "to 32 px |", "|---|---|--:|--:|--:|--:|"]
    for name, r in results.items():
        base = r["as_trained"]
        rows.append(f"| {name} | {r.get('arch')} | {base:.2f} | "
                    + " | ".join(_cell(r[c], base) for c in COLUMNS[1:]) + " |")
    any_row = next(iter(results.values()))
    return ("\n".join(rows) + f"\n\nkNN top-1 (%, k = {any_row['k']}, T = "
            f"{any_row['temperature']}) on the holdout split ({any_row['holdout_samples']} "
            f"training images), in brackets the change from as trained; measured by `python -m "
            f"seed_core.report.small_views` (`metrics/small_views.json`).\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seed_core.report.small_views",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a canonical model (models/student, models/teacher, ...)")
    parser.add_argument("--shards", default="data/shards/train")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="metrics/small_views.json")
    parser.add_argument("--readme", help="rewrite this README's small-views section")
    parser.add_argument("--check", action="store_true", help="exit 1 if --readme is stale")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.model:
        results = {}
        for item in args.model:
            name, sep, path = item.partition("=")
            if not sep:
                parser.error(f"--model {item}: write NAME=DIR")
            results[name] = measure(path, args.shards, args.params)
            log.info("%s: %s", name, results[name])
        write_json(args.out, results)
    if args.readme:
        return refresh_section(args.readme, BEGIN, END, section(read_json(args.out)),
                               check=args.check, what="the small-views table",
                               command=f"python -m seed_core.report.small_views --readme "
                                       f"{args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
