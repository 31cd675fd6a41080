"""The plan of an epoch, without training: which sample keys each rank gets at each step, which
loader worker builds the batch, and the class counts of every batch, so a user can audit their
data before spending GPU days:

    python -m seed_core.data plan --shards data/shards/train --batch-size 256 \\
        --world-size 8 --workers 4 --epoch 0 [--seed 0] [--start-step 0] [--loader-start E:S] \\
        [--json]

`--batch-size` is the global batch (as `distill.batch_size` in params.yaml), split over
`--world-size` ranks. The worker that builds a batch depends on where the run's loader started:
one loader spans every epoch of a run (`training_batches`), handing batches to its workers in
turn, so `--loader-start` is the (epoch, step) at which the run started or last resumed
(default 0:0, or the planned epoch at `--start-step` when that is given). The training loader
follows this plan exactly (tests check it).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from seed_core.data.order import EpochPlan, epoch_order
from seed_core.data.shardset import ShardSet, open_shards


def batch_worker(epoch: int, step: int, loader_start: tuple[int, int], steps: int,
                 workers: int) -> int | None:
    """The loader worker that builds the batch of `(epoch, step)`: a DataLoader hands out
    batches round-robin from the first one it builds, `loader_start`, and a run's loader spans
    its epochs (`steps` per epoch); None = the main process (workers=0)."""
    if workers == 0:
        return None
    built_before = (epoch - loader_start[0]) * steps + step - loader_start[1]
    if built_before < 0:
        raise ValueError(f"epoch {epoch} step {step} comes before the loader's start "
                         f"{loader_start[0]}:{loader_start[1]}")
    return built_before % workers


def mixing(class_counts: np.ndarray, proportions: np.ndarray, num_samples: int) -> dict[str, float]:
    """How far batches' class counts `(batches, C)` are from the dataset's class proportions.

    Returns the mean Pearson chi-square per degree of freedom over batches, and its value
    expected under uniform random sampling without replacement ((N - G) / (N - 1)): a ratio far
    above 1 means batches hold few classes (e.g. shards cut from a class-sorted TSV).
    """
    present = proportions > 0
    batch = class_counts.sum(axis=1, keepdims=True)
    expected = batch * proportions[None, :]
    chi2 = (((class_counts - expected) ** 2)[:, present] / expected[:, present]).sum(axis=1)
    dof = max(int(present.sum()) - 1, 1)
    g = int(batch[0, 0]) if batch.size else 0
    uniform = (num_samples - g) / max(num_samples - 1, 1)
    measured = float(chi2.mean() / dof) if chi2.size else float("nan")
    return {"chi2_per_dof": measured, "uniform_chi2_per_dof": uniform,
            "ratio": measured / uniform if uniform > 0 else float("nan")}


def epoch_plan(shards: ShardSet, global_batch: int, world_size: int, workers: int, epoch: int,
               seed: int, start_step: int = 0,
               loader_start: tuple[int, int] | None = None) -> dict[str, Any]:
    """The plan as a JSON-able dict (see the module docstring). `loader_start`: where the
    run's loader started, default `(epoch, start_step)` when resuming mid-epoch, else (0, 0)."""
    plan = EpochPlan(shards.samples, global_batch, world_size)
    if loader_start is None:
        loader_start = (epoch, start_step) if start_step else (0, 0)
    index = shards.index
    order = epoch_order(shards.samples, seed, epoch)
    num_classes = shards.num_classes
    batches = []
    global_counts = []
    for step in range(start_step, plan.steps):
        step_counts = np.zeros(num_classes, dtype=np.int64)
        for rank in range(world_size):
            samples = order[list(plan.positions(step, rank))]
            counts = np.bincount(index.labels[samples], minlength=num_classes)
            step_counts += counts
            batches.append({"step": step, "rank": rank,
                            "worker": batch_worker(epoch, step, loader_start, plan.steps,
                                                   workers),
                            "keys": [index.key(int(i)) for i in samples],
                            "class_counts": counts.tolist()})
        global_counts.append(step_counts)
    proportions = np.bincount(index.labels, minlength=num_classes) / shards.samples
    left_out = order[plan.steps * global_batch:]
    return {"shards": shards.root, "samples": shards.samples, "num_classes": num_classes,
            "epoch": epoch, "seed": seed, "global_batch": global_batch,
            "world_size": world_size, "batch_size": plan.batch_size, "workers": workers,
            "steps": plan.steps, "start_step": start_step,
            "loader_start": list(loader_start),
            "left_out": [index.key(int(i)) for i in left_out],
            "mixing": mixing(np.array(global_counts).reshape(-1, num_classes), proportions,
                             shards.samples),
            "batches": batches}


def render(plan: dict[str, Any], max_keys: int = 8) -> str:
    """A human-readable plan: one line per rank and step."""
    mix = plan["mixing"]
    lines = [f"{plan['shards']}: {plan['samples']} samples, {plan['num_classes']} classes",
             f"epoch {plan['epoch']} (seed {plan['seed']}): global batch {plan['global_batch']} "
             f"= {plan['world_size']} rank(s) x {plan['batch_size']}, {plan['steps']} steps, "
             f"{len(plan['left_out'])} samples left out this epoch",
             f"class mixing: chi-square per dof {mix['chi2_per_dof']:.3f} (uniform sampling: "
             f"{mix['uniform_chi2_per_dof']:.3f}, ratio {mix['ratio']:.2f})",
             f"{plan['workers']} loader worker(s) per rank, taking batches in turn from the "
             f"loader's start {plan['loader_start'][0]}:{plan['loader_start'][1]}"]
    for batch in plan["batches"]:
        worker = "main" if batch["worker"] is None else f"worker {batch['worker']}"
        keys = batch["keys"]
        shown = " ".join(keys[:max_keys]) + (f" ... (+{len(keys) - max_keys})"
                                             if len(keys) > max_keys else "")
        lines.append(f"step {batch['step']:>5} rank {batch['rank']:>3} ({worker}): classes "
                     f"{batch['class_counts']} keys {shown}")
    return "\n".join(lines)


def loader_position(text: str) -> tuple[int, int]:
    """`EPOCH:STEP` -> (epoch, step)."""
    epoch, sep, step = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return int(epoch), int(step)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not EPOCH:STEP, e.g. 0:0") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seed_core.data",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan", help="print the plan of one epoch")
    p.add_argument("--shards", required=True, help="shards directory or URL prefix")
    p.add_argument("--batch-size", type=int, required=True, help="the global batch")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="loader workers per rank")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="distill.seed / pretrain.seed")
    p.add_argument("--start-step", type=int, default=0, help="as when resuming mid-epoch")
    p.add_argument("--loader-start", type=loader_position, default=None, metavar="EPOCH:STEP",
                   help="where the run started or last resumed (decides the worker column); "
                        "default 0:0, or EPOCH:START_STEP with --start-step")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--max-keys", type=int, default=8, help="keys shown per batch (text)")
    args = parser.parse_args(argv)
    try:
        plan = epoch_plan(open_shards(args.shards), args.batch_size, args.world_size,
                          args.workers, args.epoch, args.seed, args.start_step,
                          args.loader_start)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan) if args.json else render(plan, args.max_keys))
    return 0
