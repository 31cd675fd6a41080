"""Stage `teacher_cache`: the frozen teacher's embeddings of the training set (evaluation
transform), so `distill.queue_init: cache` starts SEED's queue from real teacher embeddings
instead of random noise. Runs alone or under torchrun (each sample exactly once)."""

from __future__ import annotations

import argparse
import logging

from safetensors.torch import save_file

from seed_core import distributed
from seed_core.data.loader import eval_loader, open_shards
from seed_core.data.transforms import eval_transform
from seed_core.evaluation.features import extract_features, merge_by_index
from seed_core.io import atomic_dir, write_json
from seed_core.stagekit import stage
from seed_core.teachers.canonical import load_canonical

log = logging.getLogger("teacher_cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="canonical teacher (dir or file)")
    parser.add_argument("--shards", required=True, help="training shards directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stage("teacher_cache", args.params) as ctx:
        rt, params = ctx.runtime, ctx.params
        teacher, meta = load_canonical(args.teacher, device=rt.device)
        teacher.eval()
        shards = open_shards(args.shards)
        loader = eval_loader(shards, eval_transform(params.data.image_size),
                             params.features.batch_size, workers=params.data.workers,
                             rank=rt.rank, world_size=rt.world_size)
        part = extract_features(teacher, loader, rt.device, params.features.precision,
                                desc="teacher embeddings")
        # N x D with D = 128 for MoCo/SWAV heads: gathering objects is fine even for ImageNet
        embeddings, labels, index = merge_by_index(distributed.all_gather_objects(part))
        if rt.is_main:
            skipped = shards.samples - index.numel()
            with atomic_dir(args.out) as tmp:
                save_file({"embeddings": embeddings.contiguous(), "labels": labels.contiguous(),
                           "index": index.contiguous()}, str(tmp / "embeddings.safetensors"))
                write_json(tmp / "meta.json", {"teacher": meta, "samples": index.numel(),
                                               "skipped": skipped})
            log.info("cached %d teacher embeddings of width %d (%d could not be decoded)",
                     index.numel(), embeddings.shape[1], skipped)
            ctx.finish(args.metrics, {"samples": index.numel(), "skipped": skipped,
                                      "embed_dim": embeddings.shape[1]})


if __name__ == "__main__":
    main()
