"""Training and inference loops shared by the stages. No I/O, no torch.distributed: collectives
come in as callables, and each step returns a dict of named values."""

from __future__ import annotations

import contextlib
import math
import logging
import sys
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for `precision` in auto|fp32|bf16|fp16 (auto: fp16 on CUDA, fp32 on CPU)."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def uses_grad_scaler(device: torch.device, precision: str) -> bool:
    return device.type == "cuda" and precision in ("auto", "fp16")


def progress(iterable: Iterable, **kwargs: Any) -> tqdm:
    """tqdm that stays quiet when stderr is not a terminal (CI, DVC logs)."""
    return tqdm(iterable, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[dict],
                     device: torch.device, precision: str = "fp32",
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `fn` over an evaluation loader.

    Returns:
        features `(N, F)` float32 on CPU, labels `(N,)`, global sample indices `(N,)`, sorted by
        index (this rank's share only; see `merge_by_index` to combine ranks).
    """
    feats, labels, index = [], [], []
    for batch in progress(loader, desc=desc, unit="batch"):
        with autocast(device, precision):
            out = fn(batch["image"].to(device, non_blocking=True))
        feats.append(out.float().cpu())
        labels.append(batch["label"])
        index.append(batch["index"])
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return merge_by_index([(torch.cat(feats), torch.cat(labels), torch.cat(index))])


def merge_by_index(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate (features, labels, index) parts and sort by index; duplicates are an error."""
    parts = [p for p in parts if p[2].numel()]
    if not parts:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    feats = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    index = torch.cat([p[2] for p in parts])
    order = torch.argsort(index)
    index = index[order]
    if index.numel() > 1 and bool((index[1:] == index[:-1]).any()):
        dup = index[1:][index[1:] == index[:-1]][:5].tolist()
        raise RuntimeError(f"sample indices seen twice while merging features: {dup}")
    return feats[order], labels[order], index


# ----------------------------------------------------------------------------- optimisation


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of MoCo and SEED: lr = base x global batch / 256."""
    return base_lr * global_batch / 256


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up from ~0, then half a cosine down to 0."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress_ = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress_))
    return factor


def build_sgd(model: torch.nn.Module, lr: float, momentum: float,
              weight_decay: float) -> torch.optim.SGD:
    """SGD over the trainable parameters; weight decay on all of them, as MoCo and SEED do."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)


class NonFiniteLossError(RuntimeError):
    pass


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"loss is {loss.item()} at {where}: training diverged. Lower the learning rate "
            f"(lr), raise the temperatures, or use precision fp32; the last checkpoint is kept")


# ----------------------------------------------------------------------------- MoCo-v2


@torch.no_grad()
def momentum_update(key_encoder: torch.nn.Module, query_encoder: torch.nn.Module,
                    momentum: float) -> None:
    """key = m * key + (1 - m) * query, parameters only (BN statistics are the key's own)."""
    for k, q in zip(key_encoder.parameters(), query_encoder.parameters()):
        k.mul_(momentum).add_(q.detach(), alpha=1.0 - momentum)


def moco_step(query_encoder: torch.nn.Module, key_encoder: torch.nn.Module, queue: Any,
              views: list[torch.Tensor], *, temperature: float, key_momentum: float,
              optimizer: torch.optim.Optimizer, scaler: Any, gather: Callable,
              amp: Callable[[], contextlib.AbstractContextManager],
              where: str) -> dict[str, float]:
    """One MoCo-v2 step: InfoNCE of the queries against their keys and the queue, then enqueue.

    `query_encoder` may be DDP-wrapped; `key_encoder` is a plain module updated by momentum from
    the query encoder's parameters (unwrapped).
    """
    from seed_core.losses import infonce_loss

    images_q, images_k = views
    plain_query = getattr(query_encoder, "module", query_encoder)
    momentum_update(key_encoder, plain_query, key_momentum)
    with torch.no_grad(), amp():
        key_z = key_encoder(images_k).float()
    with amp():
        query_z = query_encoder(images_q).float()
    loss = infonce_loss(query_z, key_z, queue.buffer, temperature)
    check_finite(loss, where)
    optimizer.zero_grad(set_to_none=True)
    _backward_step(loss, optimizer, scaler)
    queue.enqueue(gather(key_z))
    return {"loss": loss.item()}


def _backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


# ----------------------------------------------------------------------------- SEED


def seed_step(student: torch.nn.Module, teacher: torch.nn.Module, queue: Any,
              views: list[torch.Tensor], *, t_student: float, t_teacher: float,
              optimizer: torch.optim.Optimizer, scaler: Any, gather: Callable,
              amp: Callable[[], contextlib.AbstractContextManager], where: str,
              small_queue: Any = None, with_stats: bool = True) -> dict[str, float]:
    """One SEED step. `views[0]` is the global view both networks see; `views[1:]` are SEED's
    optional small patches, distilled against their own queue (one patch per image enqueued).

    `student` may be DDP-wrapped; `teacher` is frozen, in eval mode, outside DDP. The monitoring
    values (agreement, queue entropy) cost extra B x K products: ask for them only when logging.
    """
    from seed_core.losses import queue_entropy, seed_agreement, seed_loss

    image, patches = views[0], views[1:]
    with torch.no_grad(), amp():
        teacher_z = teacher(image).float()
        teacher_p = teacher(torch.cat(patches)).float() if patches else None
    with amp():
        student_z = student(image).float()
        student_p = student(torch.cat(patches)).float() if patches else None
    loss = seed_loss(student_z, teacher_z, queue.buffer, t_student, t_teacher)
    if patches:
        loss = loss + seed_loss(student_p, teacher_p, small_queue.buffer, t_student, t_teacher)
    check_finite(loss, where)
    optimizer.zero_grad(set_to_none=True)
    _backward_step(loss, optimizer, scaler)
    metrics = {"loss": loss.item()}
    if with_stats:
        metrics["agreement"] = seed_agreement(student_z.detach(), teacher_z, queue.buffer).item()
        metrics["queue_entropy"] = queue_entropy(teacher_z, queue.buffer, t_teacher).item()
    queue.enqueue(gather(teacher_z))
    if patches:
        # the first patch of every image stands for its image in the patch queue
        small_queue.enqueue(gather(teacher_p[:image.shape[0]]))
    return metrics


# ----------------------------------------------------------------------------- the epoch loop


def run_epochs(*, start: Any, epochs: int, steps_per_epoch: int,
               make_loader: Callable[[int, int], Iterable[dict]],
               step: Callable[[dict, Any, bool], dict[str, float]],
               scheduler: Any, log_every: int,
               on_log: Callable[[int, Any, dict[str, float]], None],
               checkpoint_every: int | None = None,
               on_checkpoint: Callable[[Any], None] | None = None,
               crash_after: int | None = None, desc: str = "train") -> int:
    """Drive `step` from position `start` (a `resume.Position`) to the end of `epochs`.

    `step(batch, position, want_stats)` runs one optimisation step; the scheduler advances once
    per step; `on_log(global_step, position, metrics)` gets every `log_every`-th step and the last;
    `on_checkpoint(next_position)` every `checkpoint_every` steps. `crash_after` kills the process
    (SIGKILL, as a crash would) after that global step: the resume tests use it.

    Returns the number of steps run.
    """
    import os
    import signal

    total = epochs * steps_per_epoch
    position = start
    ran = 0
    bar = progress(range(total), desc=desc, unit="step", initial=0)
    bar.update(position.epoch * steps_per_epoch + position.step)
    while position.epoch < epochs:
        loader = make_loader(position.epoch, position.step)
        for batch in loader:
            global_step = position.epoch * steps_per_epoch + position.step
            done = global_step + 1
            want_log = done % log_every == 0 or done == total
            metrics = step(batch, position, want_log)
            scheduler.step()
            ran += 1
            bar.update(1)
            if want_log:
                metrics["lr"] = scheduler.get_last_lr()[0]
                on_log(done, position, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            position = position.after(steps_per_epoch)
            if checkpoint_every and on_checkpoint and done % checkpoint_every == 0 and done < total:
                on_checkpoint(position)
            if crash_after is not None and done == crash_after:
                log.warning("crash injected after step %d (SEED_CRASH_AFTER_STEP)", done)
                os.kill(os.getpid(), signal.SIGKILL)
        if position.step != 0:
            raise RuntimeError(f"the loader of epoch {position.epoch} ended after step "
                               f"{position.step} of {steps_per_epoch}")
    bar.close()
    return ran
