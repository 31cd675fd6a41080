"""Stage `pretrain`: MoCo-v2 self-supervised pre-training, used twice by the pipeline.

`--target teacher` pre-trains the teacher (`teacher.arch`) unless `teacher.checkpoint` names an
external file;
`--target baseline` trains the student architecture (`student.arch`) alone: the SSL baseline of the
paper's tables. Launch with torchrun (gloo on CPU, NCCL on GPU); resumable after a crash, also
with another number of processes. The result is written in the canonical form that
`stages/teacher.py` and the evaluation stages read.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
from pathlib import Path

import torch

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import distributed, program
from seed_core.config import ConfigError, Params
from seed_core.data.order import stream_seed
from seed_core.data.shardset import open_shards
from seed_core.data import device_augment
from seed_core.data.transforms import MultiView, colour_later, moco_v2_transform
from seed_core.io import atomic_dir, write_json
from seed_core.launch import stage
from seed_core.models.encoder import build_encoder
from seed_core.precision import autocast, training_precision
from seed_core.queue import EmbeddingQueue
from seed_core.stagekit import add_params_arguments, run_times
from seed_core.tracking import curve_metrics
from seed_core.train.curves import StepLog
from seed_core.train.moco import moco_step
from seed_core.train.run import (CURVE_COLUMNS, TrainingRun, checkpoint_store, per_rank_batch,
                                 place, place_module, timed)
from seed_core.train.schedule import schedule_for

log = logging.getLogger("pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["teacher", "baseline"], required=True,
                        help="what to pre-train: the teacher or the student baseline")
    parser.add_argument("--shards", required=True, help="training shards: directory or URL")
    parser.add_argument("--out", required=True, help="output directory (canonical model)")
    parser.add_argument("--curves", required=True, help="per-step CSV (a DVC plot)")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    add_params_arguments(parser)
    parser.add_argument("--checkpoint-dir", default=None,
                        help="resumable state (default: checkpoints/pretrain_<role>)")
    return parser.parse_args(argv)


def role_arch(params: Params, role: str) -> tuple[str, bool, int]:
    """(architecture, small_images, epochs) of what `role` pre-trains."""
    if role == "teacher":
        return (params.teacher.arch, params.teacher.small_images,
                params.pretrain.teacher_epochs)
    return params.student.arch, params.student.small_images, params.pretrain.epochs


def write_skipped(args: argparse.Namespace, params: Params) -> None:
    """With an external teacher checkpoint there is nothing to pre-train; say so in the outputs."""
    reason = f"teacher.checkpoint is set ({params.teacher.checkpoint}); no pre-training needed"
    with atomic_dir(args.out) as tmp:
        write_json(tmp / "skipped.json", {"skipped": True, "reason": reason})
    StepLog(args.curves, CURVE_COLUMNS).write()
    write_json(args.metrics, {"skipped": True, "reason": reason, "seconds": 0.0, **run_times()})
    log.info("skipped: %s", reason)


def pretrain(args: argparse.Namespace, params: Params, rt: distributed.Runtime,
             tracker) -> dict:
    cfg, data = params.pretrain, params.data
    arch, small_images, epochs = role_arch(params, args.target)
    keys_per_rank = per_rank_batch(cfg.batch_size, rt.world_size, "pretrain.batch_size")
    if cfg.shuffle_bn_group and keys_per_rank % cfg.shuffle_bn_group:
        raise ConfigError(f"params: 'pretrain.shuffle_bn_group' = {cfg.shuffle_bn_group} does "
                          f"not divide the {keys_per_rank} keys of each of the {rt.world_size} "
                          f"processes of this launch (WORLD_SIZE); choose a divisor",
                          "pretrain.shuffle_bn_group")
    shards = open_shards(args.shards)
    schedule = schedule_for(cfg, epochs, shards)

    torch.manual_seed(cfg.seed)  # same initial weights and queue on every rank
    encoder = build_encoder(arch, small_images, cfg.embed_dim, hidden_dim=cfg.hidden_dim)
    precision = training_precision(cfg.precision, rt.device, encoder, [data.image_size],
                                   "pretrain.precision")
    # copied before the query's BatchNorms span the ranks: with shuffling BN, the key encoder
    # normalises each group of the shuffled batch on its own (seed_core.train.moco)
    key = place_module(copy.deepcopy(encoder).requires_grad_(False), rt,
                       sync_bn=cfg.shuffle_bn_group == 0)
    query, model = place(encoder, rt)
    queue = EmbeddingQueue(cfg.queue_size, cfg.embed_dim, rt.device)
    queue.fill_random(torch.Generator().manual_seed(cfg.seed))
    colour_on_device = device_augment.colour_on_device(data.colour_on, rt.device)
    config = {"stage": "pretrain", "role": args.target, "arch": arch, "epochs": epochs,
              "small_images": small_images, "image_size": data.image_size,
              "colour_on_device": colour_on_device,
              **{k: v for k, v in dataclasses.asdict(cfg).items()
                 if k not in ("log_every", "checkpoint_every", "nproc")}}
    run = TrainingRun(runtime=rt, schedule=schedule, saved_modules={"query": query, "key": key},
                      trainable=query, queues={"queue": queue},
                      steplog=StepLog(args.curves, CURVE_COLUMNS),
                      store=checkpoint_store(args.checkpoint_dir or
                                             f"checkpoints/pretrain_{args.target}", config,
                                             shards, __file__),
                      precision=cfg.precision, max_bad_fraction=data.max_bad_fraction,
                      stop_grace_s=params.launch.stop_grace_s)
    log.info("MoCo-v2 %s (%s): %d epochs x %d steps, global batch %d, lr %.4f, %d rank(s) on %s "
             "(%s), colour ops on the %s", args.target, arch, epochs, schedule.steps_per_epoch,
             cfg.batch_size, schedule.lr, rt.world_size, rt.device, precision,
             "device" if colour_on_device else "loader workers")
    transform = MultiView([moco_v2_transform(data.image_size)] * 2)

    def step(batch: dict, position, want_stats: bool) -> dict[str, float]:
        return moco_step(model, key, queue, batch["views"], temperature=cfg.temperature,
                         key_momentum=cfg.key_momentum, optimizer=run.optimizer,
                         scaler=run.scaler, gather=distributed.gather_cat,
                         amp=lambda: autocast(rt.device, precision),
                         where=f"pretrain {args.target} epoch {position.epoch} "
                               f"step {position.step}",
                         shuffle_bn_group=cfg.shuffle_bn_group,
                         shuffle_seed=stream_seed("shuffle bn", cfg.seed, position.epoch,
                                                  position.step),
                         rank=rt.rank, world_size=rt.world_size)

    ran, seconds = timed(lambda: run.fit(
        shards=shards, transform=colour_later(transform) if colour_on_device else transform,
        seed=cfg.seed, workers=data.workers, step=step,
        on_metrics=lambda s, m: tracker.log_metrics(curve_metrics(m), step=s),
        checkpoint_every=cfg.checkpoint_every or schedule.steps_per_epoch, log_every=cfg.log_every,
        desc=f"pretrain {args.target}"))
    summary = {"role": args.target, "arch": arch, "epochs": epochs, **run.summary(ran, seconds)}
    run.finish(query, args.out, {"format": "seed_distill", "arch": arch,
                                 "small_images": small_images, "method": "moco_v2",
                                 "epochs": epochs, "source_path": str(args.shards)})
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stage(f"pretrain@{args.target}", args.params, args.overrides) as ctx:
        if args.target == "teacher" and not ctx.params.teacher.pretrained_here:
            if ctx.runtime.is_main:
                write_skipped(args, ctx.params)
            return
        summary = ctx.finish(args.metrics, pretrain(args, ctx.params, ctx.runtime, ctx.tracker))
        if ctx.runtime.is_main:
            ctx.tracker.log_artifact(args.curves)
        log.info("done: %s", summary)


if __name__ == "__main__":
    program.run(main)
