"""Stage `distill`: SEED self-supervised distillation of the student from the frozen teacher.

Launched by torchrun with `distill.nproc` processes (gloo on CPU, NCCL on GPU), on one machine or
several. Resumable: a checkpoint every `distill.checkpoint_every` steps, and a re-run after a
crash continues from it, also with another number of processes. Writes the student in the
canonical form of the `teacher` stage, plus an MLflow model.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import distributed, program
from seed_core.config import Params, small_patch_size
from seed_core.data.order import stream_seed
from seed_core.data.shardset import open_shards
from seed_core.data import device_augment
from seed_core.data.transforms import (MultiView, colour_later, small_patch_transform,
                                      ssl_transform)
from seed_core.io import sha256_file
from seed_core.launch import stage
from seed_core.models.encoder import build_encoder
from seed_core.precision import autocast, channels_last, resolve, training_precision
from seed_core.queue import EmbeddingQueue
from seed_core.stagekit import add_params_arguments
from seed_core.teachers.canonical import load_canonical, resolve_canonical_file
from seed_core.tracking import curve_metrics
from seed_core.train.curves import StepLog
from seed_core.train.distill import seed_step
from seed_core.train.run import (CURVE_COLUMNS, TrainingRun, checkpoint_store, per_rank_batch,
                                 place, timed)
from seed_core.train.schedule import schedule_for

log = logging.getLogger("distill")
# distillation diagnostics logged beside the loss (see seed_core.losses)
DIAGNOSTICS = ["target_off_positive", "agreement"]
# the teacher's SSL method decides the augmentation, as SEED's code does (`tools/utils.py`):
# every other format (MoCo-v2, MoCo-v3, DINO, our own...) gets the MoCo-v2 recipe
RECIPE_OF_FORMAT = {"swav": "swav", "simclr": "simclr", "moco_v1": "moco_v1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="canonical teacher (dir or .safetensors)")
    parser.add_argument("--shards", required=True, help="training shards: directory or URL")
    parser.add_argument("--out", required=True, help="output directory for the student")
    parser.add_argument("--curves", required=True, help="per-step CSV (a DVC plot)")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--teacher-cache", default=None,
                        help="teacher embeddings (stage teacher_cache) for queue_init: cache")
    add_params_arguments(parser)
    parser.add_argument("--checkpoint-dir", default="checkpoints/distill")
    parser.add_argument("--no-mlflow-model", action="store_true",
                        help="skip logging the student as an MLflow model")
    return parser.parse_args(argv)


def initial_queue(params: Params, embed_dim: int, cache_path: str | None,
                  device: torch.device) -> EmbeddingQueue:
    """Random unit vectors (SEED's code) or real teacher embeddings from the cache, shuffled."""
    cfg = params.distill
    queue = EmbeddingQueue(cfg.queue_size, embed_dim, device)
    if cfg.queue_init == "random":
        queue.fill_random(torch.Generator().manual_seed(cfg.seed))
        return queue
    if not cache_path:
        raise ValueError("distill.queue_init is 'cache' but no --teacher-cache was given "
                         "(the dvc.yaml stage passes data/teacher_cache)")
    path = Path(cache_path)
    path = path / "embeddings.safetensors" if path.is_dir() else path
    embeddings = load_file(str(path))["embeddings"]
    if embeddings.shape[0] < cfg.queue_size:
        raise ValueError(f"{path}: {embeddings.shape[0]} cached embeddings cannot fill "
                         f"distill.queue_size={cfg.queue_size}; lower the queue size")
    if embeddings.shape[1] != embed_dim:
        raise ValueError(f"{path}: cached embeddings have width {embeddings.shape[1]}, the "
                         f"teacher's is {embed_dim}: re-run stage teacher_cache")
    order = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    queue.fill(embeddings[order].to(device))
    return queue


def distill_transform(params: Params, teacher_format: str) -> MultiView:
    cfg = params.distill
    recipe = cfg.augmentation
    if recipe == "auto":
        recipe = RECIPE_OF_FORMAT.get(teacher_format, "moco_v2")
    views = [ssl_transform(recipe, params.data.image_size)]
    if cfg.small_views:
        views += [small_patch_transform(small_patch_size(params.data, cfg))] * cfg.small_views
    return MultiView(views)


def distill(args: argparse.Namespace, params: Params, rt: distributed.Runtime, tracker) -> dict:
    cfg, data = params.distill, params.data
    per_rank_batch(cfg.batch_size, rt.world_size, "distill.batch_size")
    shards = open_shards(args.shards)
    schedule = schedule_for(cfg, cfg.epochs, shards)
    teacher, teacher_meta = load_canonical(args.teacher, device=rt.device)
    channels_last(teacher.eval().requires_grad_(False))  # frozen, in eval mode, outside DDP
    embed_dim = int(teacher_meta["embed_dim"])
    teacher_file = resolve_canonical_file(args.teacher)

    torch.manual_seed(cfg.seed)  # same initial student on every rank
    encoder = build_encoder(params.student.arch, params.student.small_images, embed_dim,
                            hidden_dim=cfg.hidden_dim)
    view_sizes = [data.image_size] + ([small_patch_size(data, cfg)] if cfg.small_views else [])
    precision = training_precision(cfg.precision, rt.device, encoder, view_sizes,
                                   "distill.precision")
    student, model = place(encoder, rt, cfg.sync_bn)
    queues = {"queue": initial_queue(params, embed_dim, args.teacher_cache, rt.device)}
    if cfg.small_views:
        small = EmbeddingQueue(cfg.queue_size, embed_dim, rt.device)
        small.fill_random(torch.Generator().manual_seed(stream_seed("small", cfg.seed)))
        queues["small_queue"] = small
    colour_on_device = device_augment.colour_on_device(data.colour_on, rt.device)
    config = {"stage": "distill", "student": dataclasses.asdict(params.student),
              "image_size": data.image_size, "colour_on_device": colour_on_device,
              "teacher": sha256_file(teacher_file),
              "cache": (sha256_file(Path(args.teacher_cache) / "embeddings.safetensors")
                        if cfg.queue_init == "cache" and args.teacher_cache else None),
              **{k: v for k, v in dataclasses.asdict(cfg).items()
                 if k not in ("log_every", "checkpoint_every", "nproc")}}
    run = TrainingRun(runtime=rt, schedule=schedule, saved_modules={"student": student},
                      trainable=student, queues=queues,
                      steplog=StepLog(args.curves, CURVE_COLUMNS + DIAGNOSTICS),
                      store=checkpoint_store(args.checkpoint_dir, config, shards, __file__),
                      precision=cfg.precision, max_bad_fraction=data.max_bad_fraction,
                      stop_grace_s=params.launch.stop_grace_s)
    log.info("SEED %s -> %s: %d epochs x %d steps, global batch %d, lr %.4f, K=%d, "
             "%d small view(s), %d rank(s) on %s, teacher %s, student %s, colour ops on the %s",
             teacher_meta["arch"], params.student.arch, cfg.epochs, schedule.steps_per_epoch,
             cfg.batch_size, schedule.lr, cfg.queue_size, cfg.small_views, rt.world_size,
             rt.device, resolve(cfg.precision, rt.device, teacher), precision,
             "device" if colour_on_device else "loader workers")
    transform = distill_transform(params, teacher_meta["format"])

    def step(batch: dict, position, want_stats: bool) -> dict[str, float]:
        return seed_step(model, teacher, queues["queue"], batch["views"],
                         t_student=cfg.t_student, t_teacher=cfg.t_teacher,
                         optimizer=run.optimizer, scaler=run.scaler,
                         gather=distributed.gather_cat,
                         amp=lambda: autocast(rt.device, precision),
                         teacher_amp=lambda: autocast(rt.device, cfg.precision, teacher),
                         where=f"distill epoch {position.epoch} step {position.step}",
                         small_queue=queues.get("small_queue"), with_stats=want_stats)

    ran, seconds = timed(lambda: run.fit(
        shards=shards, transform=colour_later(transform) if colour_on_device else transform,
        seed=cfg.seed, workers=data.workers, step=step,
        on_metrics=lambda s, m: tracker.log_metrics(curve_metrics(m), step=s),
        checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, desc="distill"))
    last = run.steplog.rows[-1] if run.steplog.rows else {}
    summary = {"teacher_arch": teacher_meta["arch"], "student_arch": params.student.arch,
               "epochs": cfg.epochs, **run.summary(ran, seconds),
               **{f"final_{name}": last.get(name) for name in DIAGNOSTICS}}
    run.finish(student, args.out, {
        "format": "seed_distill", "arch": params.student.arch,
        "small_images": params.student.small_images, "method": "seed", "epochs": cfg.epochs,
        "teacher_arch": teacher_meta["arch"], "teacher_format": teacher_meta["format"],
        "source_path": str(teacher_file), "source_sha256": config["teacher"]})
    if rt.is_main and not args.no_mlflow_model:
        tracker.log_model(student.cpu().eval(), name="student",
                          registered_name=params.mlflow.registered_model)
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stage("distill", args.params, args.overrides) as ctx:
        summary = ctx.finish(args.metrics, distill(args, ctx.params, ctx.runtime, ctx.tracker))
        if ctx.runtime.is_main:
            ctx.tracker.log_artifact(args.curves)
        log.info("done: %s", summary)


if __name__ == "__main__":
    program.run(main)
