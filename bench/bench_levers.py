"""CPU speed levers for the training steps, measured in one process; prints one JSON object.

For the SEED step (teacher forward + student forward/backward/SGD + loss) and the MoCo-v2 step
(query forward/backward + momentum key forward) at the default config (`params.yaml`'s
teacher and student, batch, image size and queue; `--teacher`/`--student` try others), and the
SEED step at an ImageNet-like shape
(R-50 -> R-18, 224 px, batch 32, K 65,536), the median step time of:
- `fp32`: the plain step (today's default on CPU);
- `channels_last`: models and inputs in NHWC memory format (oneDNN's preferred layout);
- `fold_bn`: the frozen teacher's BatchNorms folded into its convolutions (SEED only: the
  teacher is in eval mode, so this is exact up to rounding);
- `bf16`: autocast to bfloat16 (this CPU has AVX-512 BF16);
- `compile`: `torch.compile` of the models (compile time reported apart);
- `bf16_channels_last`: both of those levers together.

    python bench/bench_levers.py [--repeats 5] [--skip-imagenet] [--skip-compile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from typing import Callable

import torch
from torch import nn

from seed_core.distributed import pick_device
from seed_core.models.encoder import build_encoder
from seed_core.precision import autocast
from seed_core.queue import EmbeddingQueue
from seed_core.train.distill import seed_step
from seed_core.train.moco import moco_step

from defaults import pipeline_defaults


def median_seconds(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of an eval-mode model with each BatchNorm folded into the conv before it."""
    import torch.fx.experimental.optimization as fx_opt

    return fx_opt.fuse(copy.deepcopy(model).eval(), inplace=False)


def first_call_seconds(step: Callable[[], None]) -> float:
    """Time of the first call: for compiled models, the compilation the timed steps skip."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def seed_case(teacher_arch: str, student_arch: str, batch: int, size: int, queue: int,
              lever: str, device: torch.device) -> tuple[Callable[[], None], float]:
    torch.manual_seed(0)
    teacher = build_encoder(teacher_arch, False, 128).to(device).eval().requires_grad_(False)
    student = build_encoder(student_arch, False, 128).to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    if lever == "fold_bn":
        teacher.backbone = fold_batchnorm(teacher.backbone)
    if lever in ("channels_last", "bf16_channels_last"):
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
        images = images.contiguous(memory_format=torch.channels_last)
    run_teacher, run_student = teacher, student
    if lever == "compile":
        run_teacher, run_student = torch.compile(teacher), torch.compile(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.03, momentum=0.9)
    bank = EmbeddingQueue(queue, 128, device)
    bank.fill_random(torch.Generator().manual_seed(0))
    precision = "bf16" if lever.startswith("bf16") else "fp32"

    def step() -> None:
        seed_step(run_student, run_teacher, bank, [images], t_student=0.2, t_teacher=1e-4,
                  optimizer=optimizer, scaler=None, gather=lambda x: x,
                  amp=lambda: autocast(device, precision), where="bench", with_stats=False)

    return step, first_call_seconds(step) if lever == "compile" else 0.0


def moco_case(arch: str, batch: int, size: int, queue: int, lever: str,
              device: torch.device) -> tuple[Callable[[], None], float]:
    torch.manual_seed(0)
    query = build_encoder(arch, False, 128).to(device)
    views = [torch.randn(batch, 3, size, size, device=device) for _ in range(2)]
    if lever in ("channels_last", "bf16_channels_last"):
        query = query.to(memory_format=torch.channels_last)
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    key = copy.deepcopy(query).requires_grad_(False)
    run_query, run_key = query, key
    if lever == "compile":
        run_query, run_key = torch.compile(query), torch.compile(key)
    optimizer = torch.optim.SGD(query.parameters(), lr=0.03, momentum=0.9)
    bank = EmbeddingQueue(queue, 128, device)
    bank.fill_random(torch.Generator().manual_seed(0))
    precision = "bf16" if lever.startswith("bf16") else "fp32"

    def step() -> None:
        # the momentum update reads the plain modules' parameters: compiled wrappers share them
        moco_step(run_query, run_key, bank, views, temperature=0.2, key_momentum=0.99,
                  optimizer=optimizer, scaler=None, gather=lambda x: x,
                  amp=lambda: autocast(device, precision), where="bench")

    return step, first_call_seconds(step) if lever == "compile" else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-imagenet", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    config = pipeline_defaults()
    parser.add_argument("--student", default=config.student, help="the default-config student")
    parser.add_argument("--teacher", default=config.teacher, help="the default-config teacher")
    args = parser.parse_args()
    device = pick_device()
    levers = ["fp32", "channels_last", "bf16", "bf16_channels_last"] + (
        [] if args.skip_compile else ["compile"])
    cases: dict[str, Callable[[str], tuple[Callable[[], None], float]]] = {
        "seed_default": lambda lever: seed_case(args.teacher, args.student, config.batch,
                                                config.size, config.queue, lever, device),
        "moco_teacher_default": lambda lever: moco_case(args.teacher, config.batch, config.size,
                                                        config.queue, lever, device),
        "moco_student_default": lambda lever: moco_case(args.student, config.batch, config.size,
                                                        config.queue, lever, device),
    }
    if not args.skip_imagenet:
        cases["seed_imagenet"] = lambda lever: seed_case("resnet50", "resnet18", 32, 224, 65536,
                                                         lever, device)
    result: dict = {"device": str(device), "threads": torch.get_num_threads(),
                    "teacher": args.teacher, "student": args.student,
                    "step_seconds": {}, "compile_seconds": {}, "speedup_over_fp32": {}}
    for case, build in cases.items():
        times = {}
        for lever in levers + (["fold_bn"] if case.startswith("seed") else []):
            step, compiled = build(lever)
            times[lever] = median_seconds(step, args.warmup, args.repeats)
            if lever == "compile":
                result["compile_seconds"][case] = compiled
        result["step_seconds"][case] = times
        result["speedup_over_fp32"][case] = {k: times["fp32"] / v for k, v in times.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
