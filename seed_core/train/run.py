"""What MoCo pre-training and SEED distillation share: the optimiser and schedule, the resumable
state, the step log, the data loop. Each stage supplies its modules, its queues and its step."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from seed_core import distributed
from seed_core.data.loader import ShardSet, train_loader
from seed_core.precision import uses_grad_scaler
from seed_core.queue import EmbeddingQueue
from seed_core.train.curves import StepLog
from seed_core.train.loop import run_epochs
from seed_core.train.resume import CheckpointStore, Position, rng_state, set_rng_state
from seed_core.train.schedule import Schedule, build_sgd, cosine_with_warmup

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """The mutable state of one training run and how to save and restore it.

    `saved_modules` are saved/restored by name (the trainable model under "model", MoCo's key
    encoder...); `queues` likewise. The DDP wrapper, if any, is never saved: its `.module` is.
    """

    runtime: distributed.Runtime
    schedule: Schedule
    saved_modules: dict[str, nn.Module]
    trainable: nn.Module
    queues: dict[str, EmbeddingQueue]
    steplog: StepLog
    store: CheckpointStore
    precision: str
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    scaler: Any = field(init=False)
    # samples the loaders could not decode, per (epoch, worker): counted, reported, not fatal
    decode_errors: dict[tuple[int, int], int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.optimizer = build_sgd(self.trainable, self.schedule.lr, self.schedule.momentum,
                                   self.schedule.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(self.schedule.total_steps,
                                               self.schedule.warmup_steps))
        self.scaler = (torch.amp.GradScaler("cuda")
                       if uses_grad_scaler(self.runtime.device, self.precision) else None)

    def state_dict(self, position: Position) -> dict[str, Any]:
        return {
            "modules": {name: m.state_dict() for name, m in self.saved_modules.items()},
            "queues": {name: q.state_dict() for name, q in self.queues.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            # every rank's RNG, so each resumes from its own state
            "rng": distributed.all_gather_objects(rng_state()),
            "position": {"epoch": position.epoch, "step": position.step},
            "steplog": self.steplog.state_dict(),
            "world_size": self.runtime.world_size,
        }

    def checkpoint(self, position: Position) -> None:
        state = self.state_dict(position)  # collective: every rank takes part
        if self.runtime.is_main:
            self.store.save(state)
        distributed.barrier()

    def restore(self) -> Position:
        """Load the last checkpoint of this configuration if there is one; else start at 0."""
        state = self.store.load()
        if state is None:
            return Position(0, 0)
        if state["world_size"] != self.runtime.world_size:
            raise RuntimeError(
                f"{self.store.path} was written by {state['world_size']} processes, this run "
                f"has {self.runtime.world_size}: resume with the same nproc, or delete it")
        device = self.runtime.device
        for name, module in self.saved_modules.items():
            module.load_state_dict(state["modules"][name], strict=True)
        for name, queue in self.queues.items():
            queue.load_state_dict(state["queues"][name])
            queue.buffer = queue.buffer.to(device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.runtime.rank])
        self.steplog.load_state_dict(state["steplog"])
        position = Position(**state["position"])
        log.info("resumed from %s at epoch %d step %d", self.store.path, position.epoch,
                 position.step)
        return position

    def fit(self, *, shards: ShardSet, transform: Callable, seed: int, workers: int,
            step: Callable[[dict, Position, bool], dict[str, float]],
            on_metrics: Callable[[int, Mapping[str, float]], None],
            checkpoint_every: int | None, log_every: int, desc: str) -> int:
        """Restore if possible, then train to the end of the schedule. Returns steps run."""
        start = self.restore()
        per_rank_batch = self.schedule.global_batch // self.runtime.world_size
        device = self.runtime.device

        def make_loader(epoch: int, start_step: int):
            loader = train_loader(shards, transform, per_rank_batch, seed=seed, epoch=epoch,
                                  rank=self.runtime.rank, steps=self.schedule.steps_per_epoch,
                                  start_step=start_step, workers=workers)
            for batch in loader:
                self.decode_errors[(epoch, batch["worker"])] = batch["decode_errors"]
                image = batch["image"]
                views = image if isinstance(image, list) else [image]
                batch["views"] = [v.to(device, non_blocking=True) for v in views]
                yield batch

        def on_log(global_step: int, position: Position, metrics: dict[str, float]) -> None:
            row = {"step": global_step, "epoch": position.epoch + (position.step + 1) /
                   self.schedule.steps_per_epoch, **metrics}
            self.steplog.add(row)
            on_metrics(global_step, row)

        crash = os.environ.get("SEED_CRASH_AFTER_STEP")
        ran = run_epochs(start=start, epochs=self.schedule.epochs,
                         steps_per_epoch=self.schedule.steps_per_epoch,
                         make_loader=make_loader, step=step, scheduler=self.scheduler,
                         log_every=log_every, on_log=on_log, checkpoint_every=checkpoint_every,
                         on_checkpoint=self.checkpoint, crash_after=int(crash) if crash else None,
                         desc=desc)
        skipped = sum(self.decode_errors.values())
        if skipped:
            log.warning("%d training samples could not be decoded and were skipped", skipped)
        return ran
