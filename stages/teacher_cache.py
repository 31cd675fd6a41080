"""Stage `teacher_cache`: the frozen teacher's embeddings of the training set (evaluation
transform), so `distill.queue_init: cache` starts SEED's queue from real teacher embeddings
instead of random noise. Runs alone or under torchrun (each sample exactly once)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from safetensors.torch import save_file

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import program
from seed_core.data.loader import check_bad_fraction, log_bad
from seed_core.data.shardset import open_shards
from seed_core.data.transforms import eval_transform
from seed_core.evaluation.extract import extract_split
from seed_core.io import atomic_dir, write_json
from seed_core.launch import stage
from seed_core.precision import channels_last, resolve
from seed_core.stagekit import add_params_arguments
from seed_core.teachers.canonical import load_canonical

log = logging.getLogger("teacher_cache")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="canonical teacher (dir or file)")
    parser.add_argument("--shards", required=True, help="training shards: directory or URL")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--metrics", required=True)
    add_params_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stage("teacher_cache", args.params, args.overrides) as ctx:
        rt, params = ctx.runtime, ctx.params
        teacher, meta = load_canonical(args.teacher, device=rt.device)
        channels_last(teacher.eval())
        shards = open_shards(args.shards)
        part = extract_split(teacher, shards, eval_transform(params.data.image_size),
                             params.features.batch_size, params.data.workers,
                             resolve(params.features.precision, rt.device, teacher), rt,
                             "teacher embeddings")
        if part is None:
            return
        log_bad(part.bad, "teacher_cache")
        check_bad_fraction(len(part.bad), shards.samples, params.data.max_bad_fraction,
                           str(shards.root), part.bad)
        with atomic_dir(args.out) as tmp:
            save_file({"embeddings": part.features.contiguous(), "labels": part.labels,
                       "index": part.index}, str(tmp / "embeddings.safetensors"))
            write_json(tmp / "meta.json", {"teacher": meta, "samples": part.index.numel(),
                                           "bad_samples": len(part.bad)})
        log.info("cached %d teacher embeddings of width %d (%d unreadable)",
                 part.index.numel(), part.features.shape[1], len(part.bad))
        ctx.finish(args.metrics, {"samples": part.index.numel(), "bad_samples": len(part.bad),
                                  "embed_dim": part.features.shape[1]})


if __name__ == "__main__":
    program.run(main)
