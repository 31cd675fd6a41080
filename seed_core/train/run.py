"""What MoCo pre-training and SEED distillation share: the resumable state of a run, the data
loop over the shards, the checks at start-up, and the end of the run (the canonical model, the
curves, the summary). Each stage supplies its modules, its queues and its step."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from seed_core import distributed
from seed_core.codemap import stage_source_files
from seed_core.config import ConfigError
from seed_core.data.device_augment import finish_view
from seed_core.data.loader import (check_bad_fraction, check_same_manifest, log_bad,
                                   training_batches)
from seed_core.data.shardset import MANIFEST_NAME, ShardSet
from seed_core.io import atomic_dir, sha256_file
from seed_core.models.encoder import Encoder
from seed_core.precision import channels_last, uses_grad_scaler
from seed_core.queue import EmbeddingQueue
from seed_core.teachers.canonical import save_canonical
from seed_core.train.curves import StepLog
from seed_core.train.loop import StepTimes, run_steps
from seed_core.train.resume import (CheckpointStore, Position, fingerprint, rng_state,
                                    set_rng_state, source_digest)
from seed_core.train.schedule import Schedule, build_sgd
from seed_core.train.stop import stop_signals

log = logging.getLogger(__name__)

# columns every training curve has; a stage may add its own diagnostics after them
CURVE_COLUMNS = ["step", "epoch", "loss", "lr", "data_seconds", "step_seconds"]


def per_rank_batch(global_batch: int, world_size: int, key: str) -> int:
    """The batch of one rank; the global batch (params `key`) must split evenly over ranks."""
    if global_batch % world_size:
        raise ConfigError(f"params: '{key}' = {global_batch} is not divisible by the "
                         f"{world_size} processes of this launch (WORLD_SIZE); choose a "
                         f"multiple of {world_size} or launch a divisor of {global_batch}")
    return global_batch // world_size


def place_module(module: nn.Module, runtime: distributed.Runtime, sync_bn: bool = True
                 ) -> nn.Module:
    """`module` on this rank's device in channels-last memory, with BatchNorm over the global
    batch when several ranks run and `sync_bn`."""
    if runtime.world_size > 1 and sync_bn:
        module = distributed.convert_sync_batchnorm(module, runtime.device)
    return channels_last(module.to(runtime.device))


def place(encoder: Encoder, runtime: distributed.Runtime, sync_bn: bool = True
          ) -> tuple[Encoder, nn.Module]:
    """The encoder placed by `place_module`, and the module to train through: DDP-wrapped when
    several ranks run."""
    encoder = place_module(encoder, runtime, sync_bn)
    return encoder, distributed.wrap_ddp(encoder, runtime, sync_bn=sync_bn)


def shards_fingerprint(shards: ShardSet) -> str:
    """What identifies the training data: its manifest (local file or fetched copy)."""
    local = Path(shards.location) / MANIFEST_NAME
    return sha256_file(local) if local.is_file() else fingerprint(shards.manifest)


def checkpoint_store(directory: str | Path, config: Mapping[str, Any], shards: ShardSet,
                     stage_file: str | Path) -> CheckpointStore:
    """The store of this configuration: `config` (the global batch in it, never the number of
    processes), the data, and the source files the stage runs."""
    files = stage_source_files(stage_file)
    root = Path(stage_file).resolve().parent.parent
    full = {**config, "shards": shards_fingerprint(shards), "code": source_digest(files, root)}
    return CheckpointStore(directory, fingerprint(full))


@dataclass
class TrainingRun:
    """The mutable state of one training run and how to save and restore it.

    `saved_modules` are saved/restored by name (the trainable model, MoCo's key encoder...);
    `queues` likewise. The DDP wrapper, if any, is never saved: its `.module` is.
    """

    runtime: distributed.Runtime
    schedule: Schedule
    saved_modules: dict[str, nn.Module]
    trainable: nn.Module
    queues: dict[str, EmbeddingQueue]
    steplog: StepLog
    store: CheckpointStore
    precision: str
    max_bad_fraction: float = 0.01
    stop_grace_s: float = 15.0  # launch.stop_grace_s (seed_core.train.stop)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    scaler: Any = field(init=False)
    times: StepTimes = field(init=False, default_factory=StepTimes)
    # unreadable samples replaced by the loader: this rank's since start, and all ranks' before
    bad: list[str] = field(init=False, default_factory=list)
    seen: int = field(init=False, default=0)
    restored_bad: int = field(init=False, default=0)
    restored_seen: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.optimizer = build_sgd(self.trainable, self.schedule.lr, self.schedule.momentum,
                                   self.schedule.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           self.schedule.multiplier())
        self.scaler = (torch.amp.GradScaler("cuda")
                       if uses_grad_scaler(self.runtime.device, self.precision) else None)

    def bad_counts(self) -> tuple[int, int]:
        """(unreadable samples, samples read) over all ranks and the run so far (collective)."""
        counts = torch.tensor([len(self.bad), self.seen], dtype=torch.float64)
        bad, seen = distributed.all_reduce_sum(counts).tolist()
        return self.restored_bad + int(bad), self.restored_seen + int(seen)

    def state_dict(self, position: Position) -> dict[str, Any]:
        bad, seen = self.bad_counts()
        return {
            "modules": {name: m.state_dict() for name, m in self.saved_modules.items()},
            "queues": {name: q.state_dict() for name, q in self.queues.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            # the loader seeds every sample itself; this only keeps anything else exact
            "rng": rng_state(),
            "position": {"epoch": position.epoch, "step": position.step},
            "steplog": self.steplog.state_dict(),
            "times": self.times.state_dict(),
            "bad": {"samples": bad, "seen": seen},
            "global_batch": self.schedule.global_batch,
        }

    def checkpoint(self, position: Position) -> None:
        state = self.state_dict(position)  # collective: every rank takes part
        if self.runtime.is_main:
            self.store.save(state, position.global_step(self.schedule.steps_per_epoch))
        distributed.barrier()

    def restore(self) -> Position:
        """Load the newest intact checkpoint of this configuration if any; else start at 0."""
        state = self.store.load()
        if state is None:
            return Position(0, 0)
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
        set_rng_state(state["rng"])
        self.steplog.load_state_dict(state["steplog"])
        self.times.load_state_dict(state["times"])
        self.restored_bad, self.restored_seen = state["bad"]["samples"], state["bad"]["seen"]
        position = Position(**state["position"])
        log.info("resumed from %s at epoch %d step %d", self.store.loaded_from, position.epoch,
                 position.step)
        return position

    def _check_bad(self, where: str) -> None:
        # per rank, with the restored counts shared out: no collective needed on every step
        share = self.runtime.world_size
        check_bad_fraction(len(self.bad) + self.restored_bad // share,
                           self.seen + self.restored_seen // share, self.max_bad_fraction,
                           where, self.bad)

    def _device_batches(self, loader: Any, where: str) -> Iterator[dict[str, Any]]:
        device = self.runtime.device
        min_seen = int(20 / self.max_bad_fraction) if self.max_bad_fraction > 0 else 0
        for batch in loader:
            self.bad.extend(batch["bad"])
            self.seen += len(batch["key"]) + len(batch["bad"])
            if batch["bad"] and self.seen >= min_seen:
                self._check_bad(where)
            image = batch["image"]
            views = image if isinstance(image, list) else [image]
            batch["views"] = [finish_view(v, device) for v in views]
            yield batch

    def fit(self, *, shards: ShardSet, transform: Callable, seed: int, workers: int,
            step: Callable[[dict, Position, bool], dict[str, float]],
            on_metrics: Callable[[int, Mapping[str, float]], None],
            checkpoint_every: int | None, log_every: int, desc: str) -> int:
        """Restore if possible, then train to the end of the schedule. Returns steps run.
        SIGTERM or SIGUSR1 stop it at a step boundary with a checkpoint (`seed_core.train.stop`);
        before the first step they end the process as usual (there is nothing to save yet)."""
        start = self.restore()
        rt, schedule = self.runtime, self.schedule
        check_same_manifest(shards, distributed.all_gather_objects)  # before any rank trains
        loader = training_batches(
            shards, transform, per_rank_batch(schedule.global_batch, rt.world_size, "batch_size"),
            seed=seed, rank=rt.rank, world_size=rt.world_size, start=(start.epoch, start.step),
            stop=(schedule.epochs, 0), workers=workers, outlive_stop_signals=True)

        def on_log(global_step: int, position: Position, metrics: dict[str, float]) -> None:
            # collective (every rank logs the same steps): curves hold global-batch values
            row = {"step": global_step, "epoch": position.epoch + (position.step + 1) /
                   schedule.steps_per_epoch, **distributed.mean_over_ranks(metrics)}
            self.steplog.add(row)
            on_metrics(global_step, row)

        batches = self._device_batches(loader, f"{shards.root} ({desc})")
        try:
            with stop_signals(self.stop_grace_s) as received:
                ran = run_steps(start=start, total_steps=schedule.total_steps,
                                steps_per_epoch=schedule.steps_per_epoch, batches=batches,
                                step=step, scheduler=self.scheduler, log_every=log_every,
                                times=self.times, on_log=on_log,
                                checkpoint_every=checkpoint_every, on_checkpoint=self.checkpoint,
                                on_epoch_end=lambda e: self._check_bad(f"{shards.root} epoch {e}"),
                                stop_signal=lambda: distributed.max_over_ranks(received()),
                                desc=desc)
        finally:
            # the loader's workers outlive SIGTERM (seed_core.data.loader): shut them down here,
            # on every way out, not at interpreter exit, where multiprocessing would SIGTERM
            # them and wait for them forever
            batches.close()
        log_bad(self.bad, desc)
        return ran

    def summary(self, ran: int, seconds: float) -> dict[str, Any]:
        """The numbers every training stage reports (collective: all ranks call it)."""
        bad, seen = self.bad_counts()
        last = self.steplog.rows[-1] if self.steplog.rows else {}
        return {"steps": self.schedule.total_steps, "steps_run": ran,
                "final_loss": last.get("loss"),
                "images_per_s": ran * self.schedule.global_batch / seconds if seconds else None,
                "data_wait_fraction": round(self.times.data_wait_fraction, 6),
                "data_seconds": round(self.times.data, 3),
                "compute_seconds": round(self.times.compute, 3),
                "bad_samples": bad, "samples_read": seen}

    def finish(self, encoder: Encoder, out_dir: str | Path, meta: Mapping[str, Any]) -> None:
        """Rank 0 writes the trained encoder in canonical form and the curves, then drops the
        checkpoints; every rank waits for it."""
        if self.runtime.is_main:
            with atomic_dir(out_dir) as tmp:
                save_canonical(tmp / "model.safetensors", encoder.backbone.state_dict(),
                               encoder.head.state_dict(), meta)
            self.steplog.write()
            self.store.clear()
        distributed.barrier()


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    """`(fn(), seconds it took)`."""
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started
