"""Stage `features`: backbone features of the train and val shards for one model (any timm arch).

Writes `OUT/train.safetensors` and `OUT/val.safetensors` (`features` (N, F) float32, `labels`
(N,) int64, `index` (N,) int64, sorted by index; with `--embeddings` also `embeddings` (N, D),
the L2-normalised head output) and `OUT/meta.json`. Under torchrun every rank extracts its part
of the shards and rank 0 merges the parts (each sample exactly once). Unreadable samples are
left out, counted in the metrics, and fatal above `data.max_bad_fraction`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import distributed, program
from seed_core.config import Params
from seed_core.data.loader import check_bad_fraction, log_bad
from seed_core.data.shardset import ShardSet, check_same_classes, open_shards
from seed_core.data.transforms import eval_transform
from seed_core.evaluation.extract import SplitFeatures, extract_split
from seed_core.io import atomic_dir, write_json
from seed_core.launch import stage
from seed_core.precision import channels_last, resolve
from seed_core.stagekit import add_params_arguments
from seed_core.teachers.canonical import load_canonical

log = logging.getLogger("features")
SPLITS = ("train", "val")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="canonical model: a .safetensors file or a directory holding one")
    parser.add_argument("--train-shards", required=True)
    parser.add_argument("--val-shards", required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--name", default=None,
                        help="model name for the stage and metrics (default: OUT's name)")
    parser.add_argument("--metrics", default=None, help="optional metrics JSON")
    add_params_arguments(parser)
    parser.add_argument("--embeddings", action="store_true",
                        help="also store the L2-normalised embedding (head output)")
    return parser.parse_args(argv)


def make_forward(encoder: torch.nn.Module,
                 embeddings: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Backbone features `(B, F)`, or `[features | embedding]` `(B, F + D)` in one tensor so
    the extraction keeps both aligned."""
    if not embeddings:
        return encoder.features
    return lambda x: torch.cat([encoder.features(x), encoder(x)], dim=1)


def split_tensors(part: SplitFeatures, feature_dim: int, embeddings: bool
                  ) -> dict[str, torch.Tensor]:
    """The file's tensors; `[features | embedding]` split apart."""
    out = {"labels": part.labels.long(), "index": part.index.long()}
    if embeddings:
        out["features"] = part.features[:, :feature_dim].contiguous()
        out["embeddings"] = part.features[:, feature_dim:].contiguous()
    else:
        out["features"] = part.features.contiguous()
    return out


def check_counts(split: str, shards: ShardSet, part: SplitFeatures,
                 max_bad_fraction: float) -> dict[str, Any]:
    """Every sample read once but the unreadable ones, which must stay a small fraction."""
    expected, index = shards.samples, part.index
    received = int(index.numel())
    if received + len(part.bad) != expected:
        raise RuntimeError(f"{shards.root}: {received} {split} samples read + {len(part.bad)} "
                           f"unreadable != the manifest's {expected}")
    log_bad(part.bad, f"features {split}")
    check_bad_fraction(len(part.bad), expected, max_bad_fraction, f"{shards.root} ({split})",
                       part.bad)
    return {"shards": str(shards.root), "expected": expected, "received": received,
            "bad_samples": len(part.bad)}


def run(args: argparse.Namespace, params: Params, rt: distributed.Runtime) -> dict[str, Any]:
    encoder, meta = load_canonical(args.model, device=rt.device)
    channels_last(encoder.eval().requires_grad_(False))
    precision = resolve(params.features.precision, rt.device, encoder)
    feature_dim = int(meta["feature_dim"])
    expected_width = feature_dim + (int(meta["embed_dim"]) if args.embeddings else 0)
    shard_sets = {"train": open_shards(args.train_shards), "val": open_shards(args.val_shards)}
    check_same_classes(shard_sets["train"], shard_sets["val"])
    parts = {split: extract_split(make_forward(encoder, args.embeddings), shards,
                                  eval_transform(params.data.image_size),
                                  params.features.batch_size, params.data.workers,
                                  precision, rt, f"features {split}")
             for split, shards in shard_sets.items()}
    if not rt.is_main:
        return {}
    counts: dict[str, Any] = {}
    with atomic_dir(args.out) as tmp:
        for split, part in parts.items():
            if part.features.numel() and part.features.shape[1] != expected_width:
                raise RuntimeError(f"{args.model}: the model gives {part.features.shape[1]} "
                                   f"values per image, its metadata says {expected_width} "
                                   f"(feature_dim{' + embed_dim' if args.embeddings else ''})")
            counts[split] = check_counts(split, shard_sets[split], part,
                                         params.data.max_bad_fraction)
            save_file(split_tensors(part, feature_dim, args.embeddings),
                      str(tmp / f"{split}.safetensors"))
        train, val = shard_sets["train"], shard_sets["val"]
        write_json(tmp / "meta.json", {
            "name": args.name, "model_path": str(args.model),
            "model": json.loads(json.dumps(meta, default=str)),
            "num_classes": max(train.num_classes, val.num_classes),
            "class_names": list(train.class_names or val.class_names or []) or None,
            "feature_dim": feature_dim,
            "embed_dim": int(meta["embed_dim"]) if args.embeddings else None,
            "image_size": params.data.image_size, "precision": precision,
            "world_size": rt.world_size, **counts})
    return {"name": args.name, "feature_dim": feature_dim,
            **{f"{split}_samples": c["received"] for split, c in counts.items()},
            **{f"{split}_bad_samples": c["bad_samples"] for split, c in counts.items()}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.name = args.name or Path(args.out).name
    with stage(f"features@{args.name}", args.params, args.overrides) as ctx:
        summary = run(args, ctx.params, ctx.runtime)
        if ctx.runtime.is_main:
            summary = ctx.finish(args.metrics, summary) if args.metrics else summary
            log.info("done: %s", summary)


if __name__ == "__main__":
    program.run(main)
