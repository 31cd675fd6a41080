"""Benchmark of one SEED training step; prints JSON.

Measures, in one run and on the same inputs: the whole step (teacher forward, student forward and
backward, loss, SGD, enqueue) for several queue sizes, so the queue's share of the step shows, and
fp32 against bf16 autocast. Medians over `--repeats` steps after `--warmup` steps.

    python bench/bench_step.py [--teacher resnet18] [--student resnet10t] [--batch 256] [--size 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from seed_core.distributed import pick_device
from seed_core.losses import seed_loss
from seed_core.models.backbones import create_backbone
from seed_core.models.encoder import Encoder
from seed_core.models.heads import build_head, mlp_layout
from seed_core.precision import autocast
from seed_core.queue import EmbeddingQueue
from seed_core.train.distill import seed_step


def encoder(arch: str, out_dim: int) -> Encoder:
    backbone = create_backbone(arch)
    width = backbone.num_features
    return Encoder(backbone, build_head(mlp_layout(width, width, out_dim)))


def time_steps(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="resnet10t")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--queues", type=int, nargs="+", default=[256, 4096, 65536])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = pick_device()
    torch.manual_seed(0)
    teacher = encoder(args.teacher, 128).to(device).eval().requires_grad_(False)
    student = encoder(args.student, 128).to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    result = {"device": str(device), "threads": torch.get_num_threads(),
              "teacher": args.teacher, "student": args.student, "batch": args.batch,
              "image_size": args.size, "step_seconds": {}, "loss_only_seconds": {}}

    for precision in ("fp32", "bf16"):
        for k in args.queues:
            queue = EmbeddingQueue(k, 128, device)
            queue.fill_random(torch.Generator().manual_seed(0))

            def step() -> None:
                seed_step(student, teacher, queue, [images], t_student=0.2, t_teacher=1e-4,
                          optimizer=optimizer, scaler=None, gather=lambda x: x,
                          amp=lambda: autocast(device, precision), where="bench",
                          with_stats=False)

            result["step_seconds"][f"{precision}_K{k}"] = time_steps(step, args.warmup,
                                                                     args.repeats)

    # the loss alone (forward + backward through the logits), to see the B x K share
    z = torch.nn.functional.normalize(torch.randn(args.batch, 128, device=device), dim=1)
    for k in args.queues:
        queue = torch.nn.functional.normalize(torch.randn(k, 128, device=device), dim=1)

        def loss_only() -> None:
            s = z.clone().requires_grad_(True)
            seed_loss(s, z, queue, 0.2, 1e-4).backward()

        result["loss_only_seconds"][f"K{k}"] = time_steps(loss_only, args.warmup, args.repeats)

    steps = result["step_seconds"]
    smallest, largest = min(args.queues), max(args.queues)
    result["ratios"] = {
        f"fp32_K{largest}_over_K{smallest}": steps[f"fp32_K{largest}"] / steps[f"fp32_K{smallest}"],
        f"bf16_over_fp32_K{largest}": steps[f"bf16_K{largest}"] / steps[f"fp32_K{largest}"],
    }
    result["images_per_s_fp32_K4096"] = (args.batch / steps["fp32_K4096"]
                                          if "fp32_K4096" in steps else None)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
