"""Stage `distill`: SEED self-supervised distillation of the student from the frozen teacher.

Launched by torchrun with `distill.nproc` processes (gloo on CPU, NCCL on GPU). Resumable: a
checkpoint every `distill.checkpoint_every` steps, and a re-run after a crash continues from it.
Writes the student in the canonical form of the `teacher` stage, plus an MLflow model.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from seed_core import distributed
from seed_core.config import Params, small_patch_size
from seed_core.data.loader import open_shards, steps_per_epoch, stream_seed
from seed_core.data.transforms import MultiView, small_patch_transform, ssl_transform
from seed_core.io import atomic_dir, sha256_file
from seed_core.models.encoder import build_encoder
from seed_core.precision import autocast
from seed_core.queue import EmbeddingQueue
from seed_core.stagekit import stage
from seed_core.teachers.canonical import load_canonical, save_canonical
from seed_core.train.curves import StepLog
from seed_core.train.distill import seed_step
from seed_core.train.resume import CheckpointStore, fingerprint, source_digest
from seed_core.train.run import TrainingRun
from seed_core.train.schedule import Schedule

log = logging.getLogger("distill")
LOG_COLUMNS = ["step", "epoch", "loss", "lr", "queue_entropy", "agreement"]
# the teacher's SSL method decides the augmentation (SEED follows its teacher)
RECIPE_OF_FORMAT = {"swav": "swav", "simclr": "simclr"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="canonical teacher (dir or .safetensors)")
    parser.add_argument("--shards", required=True, help="training shards directory")
    parser.add_argument("--out", required=True, help="output directory for the student")
    parser.add_argument("--curves", required=True, help="per-step CSV (a DVC plot)")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--teacher-cache", default=None,
                        help="teacher embeddings (stage teacher_cache) for queue_init: cache")
    parser.add_argument("--params", default="params.yaml")
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
    teacher, teacher_meta = load_canonical(args.teacher, device=rt.device)
    teacher.eval().requires_grad_(False)  # frozen, in eval mode, outside DDP
    embed_dim = int(teacher_meta["embed_dim"])

    torch.manual_seed(cfg.seed)  # same initial student on every rank
    student = build_encoder(params.student.arch, params.student.small_images, embed_dim,
                            hidden_dim=cfg.hidden_dim)
    if rt.world_size > 1 and cfg.sync_bn:
        student = distributed.convert_sync_batchnorm(student, rt.device)
    student = student.to(rt.device)
    model = distributed.wrap_ddp(student, rt, sync_bn=cfg.sync_bn)
    queues = {"queue": initial_queue(params, embed_dim, args.teacher_cache, rt.device)}
    if cfg.small_views:
        small = EmbeddingQueue(cfg.queue_size, embed_dim, rt.device)
        small.fill_random(torch.Generator().manual_seed(stream_seed("small", cfg.seed)))
        queues["small_queue"] = small

    shards = open_shards(args.shards)
    schedule = Schedule(cfg.epochs, steps_per_epoch(shards, cfg.batch_size), cfg.batch_size,
                        cfg.lr, cfg.momentum, cfg.weight_decay, cfg.warmup_epochs)
    teacher_file = Path(args.teacher)
    teacher_file = teacher_file if teacher_file.is_file() else next(
        teacher_file.glob("*.safetensors"))
    config = {"stage": "distill", **{k: v for k, v in dataclasses.asdict(cfg).items()
                                     if k not in ("log_every", "checkpoint_every")},
              "student": dataclasses.asdict(params.student), "image_size": data.image_size,
              "workers": data.workers, "teacher": sha256_file(teacher_file),
              "shards": sha256_file(Path(args.shards) / "manifest.json"),
              "cache": (sha256_file(Path(args.teacher_cache) / "embeddings.safetensors")
                        if cfg.queue_init == "cache" and args.teacher_cache else None),
              "world_size": rt.world_size, "code": source_digest()}
    run = TrainingRun(runtime=rt, schedule=schedule, saved_modules={"student": student},
                      trainable=student, queues=queues, steplog=StepLog(args.curves, LOG_COLUMNS),
                      store=CheckpointStore(args.checkpoint_dir, fingerprint(config)),
                      precision=cfg.precision)
    log.info("SEED %s -> %s: %d epochs x %d steps, global batch %d, lr %.4f, K=%d, "
             "%d small view(s), %d rank(s) on %s", teacher_meta["arch"], params.student.arch,
             cfg.epochs, schedule.steps_per_epoch, cfg.batch_size, schedule.lr, cfg.queue_size,
             cfg.small_views, rt.world_size, rt.device)

    def step(batch: dict, position, want_stats: bool) -> dict[str, float]:
        return seed_step(model, teacher, queues["queue"], batch["views"],
                         t_student=cfg.t_student, t_teacher=cfg.t_teacher,
                         optimizer=run.optimizer, scaler=run.scaler,
                         gather=distributed.gather_cat,
                         amp=lambda: autocast(rt.device, cfg.precision),
                         where=f"distill epoch {position.epoch} step {position.step}",
                         small_queue=queues.get("small_queue"), with_stats=want_stats)

    started = time.perf_counter()
    ran = run.fit(shards=shards, transform=distill_transform(params, teacher_meta["format"]),
                  seed=cfg.seed, workers=data.workers, step=step,
                  on_metrics=lambda s, m: tracker.log_metrics(m, step=s),
                  checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
                  desc="distill")
    seconds = time.perf_counter() - started
    last = run.steplog.rows[-1] if run.steplog.rows else {}
    summary = {"teacher_arch": teacher_meta["arch"], "student_arch": params.student.arch,
               "epochs": cfg.epochs, "steps": schedule.total_steps, "steps_run": ran,
               "final_loss": last.get("loss"), "final_agreement": last.get("agreement"),
               "final_queue_entropy": last.get("queue_entropy"),
               "images_per_s": ran * cfg.batch_size / seconds if seconds > 0 else None,
               "decode_errors": sum(run.decode_errors.values())}
    if rt.is_main:
        meta = {"format": "seed_distill", "arch": params.student.arch,
                "small_images": params.student.small_images, "method": "seed",
                "epochs": cfg.epochs, "teacher_arch": teacher_meta["arch"],
                "teacher_format": teacher_meta["format"], "source_path": str(teacher_file),
                "source_sha256": config["teacher"]}
        with atomic_dir(args.out) as tmp:
            save_canonical(tmp / "model.safetensors", student.backbone.state_dict(),
                           student.head.state_dict(), meta)
        run.steplog.write()
        if not args.no_mlflow_model:
            tracker.log_model(student.cpu().eval(), name="student",
                              registered_name=params.mlflow.registered_model)
        run.store.clear()
    distributed.barrier()
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with stage("distill", args.params) as ctx:
        summary = ctx.finish(args.metrics, distill(args, ctx.params, ctx.runtime, ctx.tracker))
        if ctx.runtime.is_main:
            ctx.tracker.log_artifact(args.curves)
        log.info("done: %s", summary)


if __name__ == "__main__":
    main()
