"""Stage `features`: backbone features of the train and val shards for one model (any timm arch).

Writes `OUT/train.safetensors` and `OUT/val.safetensors` (`features` (N, F) float32, `labels`
(N,) int64, `index` (N,) int64, sorted by index; with `--embeddings` also `embeddings` (N, D),
the L2-normalised head output) and `OUT/meta.json`. Under torchrun every rank extracts its share
of the shards and writes it to a temporary directory; rank 0 merges the shares (each sample
exactly once) and checks the count against the shard manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from seed_core import distributed
from seed_core.config import Params
from seed_core.data.loader import ShardSet, eval_loader, open_shards
from seed_core.data.transforms import eval_transform
from seed_core.evaluation.features import extract_features, merge_by_index
from seed_core.io import atomic_dir, atomic_path, write_json
from seed_core.stagekit import stage
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
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--embeddings", action="store_true",
                        help="also store the L2-normalised embedding (head output)")
    parser.add_argument("--max-skip-fraction", type=float, default=0.01,
                        help="fail if more than this fraction of a split's samples is missing")
    return parser.parse_args(argv)


def make_forward(encoder: torch.nn.Module,
                 embeddings: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Backbone features `(B, F)`, or `[features | embedding]` `(B, F + D)` in one tensor so
    `extract_features` keeps both aligned."""
    if not embeddings:
        return encoder.features
    return lambda x: torch.cat([encoder.features(x), encoder(x)], dim=1)


def extract_share(encoder: torch.nn.Module, shards: ShardSet, params: Params,
                  rt: distributed.Runtime, embeddings: bool,
                  split: str) -> dict[str, torch.Tensor]:
    """This rank's share of one split."""
    loader = eval_loader(shards, eval_transform(params.data.image_size),
                         params.features.batch_size, params.data.workers, rank=rt.rank,
                         world_size=rt.world_size)
    feats, labels, index = extract_features(make_forward(encoder, embeddings), loader, rt.device,
                                            params.features.precision, desc=f"features {split}")
    return {"features": feats.contiguous(), "labels": labels, "index": index}


def merge_shares(part_files: list[Path], feature_dim: int, embeddings: bool
                 ) -> dict[str, torch.Tensor]:
    """Merge the ranks' shares by sample index; split `[features | embedding]` apart."""
    parts = [load_file(str(p)) for p in part_files]
    feats, labels, index = merge_by_index([(p["features"], p["labels"], p["index"])
                                           for p in parts])
    out = {"labels": labels.long(), "index": index.long()}
    if embeddings:
        out["features"] = feats[:, :feature_dim].contiguous()
        out["embeddings"] = feats[:, feature_dim:].contiguous()
    else:
        out["features"] = feats.contiguous()
    return out


def check_counts(split: str, shards: ShardSet, merged: dict[str, torch.Tensor],
                 max_skip_fraction: float) -> dict[str, Any]:
    """Every index within the manifest's range, and at most a small fraction missing."""
    expected, index = shards.samples, merged["index"]
    received = int(index.numel())
    if received and (int(index[0]) < 0 or int(index[-1]) >= expected):
        raise RuntimeError(f"{shards.root}: sample indices [{int(index[0])}, {int(index[-1])}] "
                           f"outside the manifest's {expected} samples")
    skips = expected - received
    if skips > max_skip_fraction * expected:
        raise RuntimeError(f"{shards.root}: only {received} of {expected} {split} samples were "
                           f"read ({skips} missing); check the shards or --max-skip-fraction")
    if skips:
        present = torch.zeros(expected, dtype=torch.bool)
        present[index] = True
        missing = torch.nonzero(~present).flatten()[:10].tolist()
        log.warning("%s: %d of %d samples could not be decoded (first indices: %s)", split,
                    skips, expected, missing)
    return {"shards": str(shards.root), "expected": expected, "received": received,
            "decode_skips": skips}


def json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def run(args: argparse.Namespace, params: Params, rt: distributed.Runtime) -> dict[str, Any]:
    encoder, meta = load_canonical(args.model, device=rt.device)
    encoder.eval().requires_grad_(False)
    feature_dim = int(meta["feature_dim"])
    shard_sets = {"train": open_shards(args.train_shards), "val": open_shards(args.val_shards)}
    # one temporary directory for all ranks' shares, chosen by rank 0 beside the output
    parts_dir = None
    if rt.is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        parts_dir = tempfile.mkdtemp(prefix=f".{Path(args.out).name}.", suffix=".parts",
                                     dir=Path(args.out).parent)
    parts_dir = Path(distributed.broadcast_object(parts_dir))
    expected_width = feature_dim + (int(meta["embed_dim"]) if args.embeddings else 0)
    try:
        for split, shards in shard_sets.items():
            share = extract_share(encoder, shards, params, rt, args.embeddings, split)
            if share["features"].numel() and share["features"].shape[1] != expected_width:
                raise RuntimeError(f"{args.model}: the model gives {share['features'].shape[1]} "
                                   f"values per image, its metadata says {expected_width} "
                                   f"(feature_dim{' + embed_dim' if args.embeddings else ''})")
            with atomic_path(parts_dir / f"{split}-rank{rt.rank:03d}.safetensors") as tmp:
                save_file(share, str(tmp))
        distributed.barrier()  # every share is on disk before rank 0 reads them
        if rt.is_main:
            return write_outputs(args, params, rt, meta, shard_sets, parts_dir)
        return {}
    finally:
        if rt.is_main:
            shutil.rmtree(parts_dir, ignore_errors=True)


def write_outputs(args: argparse.Namespace, params: Params, rt: distributed.Runtime,
                  meta: dict[str, Any], shard_sets: dict[str, ShardSet],
                  parts_dir: Path) -> dict[str, Any]:
    feature_dim = int(meta["feature_dim"])
    counts: dict[str, Any] = {}
    with atomic_dir(args.out) as tmp:
        for split, shards in shard_sets.items():
            files = sorted(parts_dir.glob(f"{split}-rank*.safetensors"))
            if len(files) != rt.world_size:
                raise RuntimeError(f"{parts_dir}: {len(files)} {split} shares for "
                                   f"{rt.world_size} ranks")
            merged = merge_shares(files, feature_dim, args.embeddings)
            counts[split] = check_counts(split, shards, merged, args.max_skip_fraction)
            save_file(merged, str(tmp / f"{split}.safetensors"))
        train, val = shard_sets["train"], shard_sets["val"]
        if train.num_classes != val.num_classes:
            log.warning("train shards have %d classes, val shards %d", train.num_classes,
                        val.num_classes)
        write_json(tmp / "meta.json", {
            "name": args.name, "model_path": str(args.model), "model": json_safe(meta),
            "num_classes": max(train.num_classes, val.num_classes),
            "class_names": list(train.class_names or val.class_names or []) or None,
            "feature_dim": feature_dim,
            "embed_dim": int(meta["embed_dim"]) if args.embeddings else None,
            "image_size": params.data.image_size, "precision": params.features.precision,
            "world_size": rt.world_size, **counts})
    return {"name": args.name, "feature_dim": feature_dim,
            **{f"{split}_samples": c["received"] for split, c in counts.items()},
            **{f"{split}_decode_skips": c["decode_skips"] for split, c in counts.items()}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.name = args.name or Path(args.out).name
    with stage(f"features@{args.name}", args.params) as ctx:
        summary = run(args, ctx.params, ctx.runtime)
        if ctx.runtime.is_main:
            summary = {**summary, "seconds": round(ctx.seconds, 3)}
            if args.metrics:
                write_json(args.metrics, summary)
            ctx.tracker.log_metrics({k: v for k, v in summary.items()
                                     if isinstance(v, (int, float))})
            log.info("done: %s", summary)


if __name__ == "__main__":
    main()
