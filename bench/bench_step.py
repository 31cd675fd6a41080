"""The SEED step against its floor, and against the released code's formulation; prints JSON.

For each case, in one process and on the same inputs, times: the teacher forward alone, the
student forward + backward + SGD alone (a loss that costs nothing), the queue floor (the B x K
teacher and student logits, both softmaxes and the backward, written plainly; or `seed_loss`
alone when that is faster), the full step (`seed_core.train.distill.seed_step`) and a plain
re-implementation of the released SEED code's step (the queue cloned twice per step, two
einsums, `cat` with the positives, softmax / log_softmax, under the student's autocast: fp16
logits under AMP on CUDA as released; on CPU, which the released code never ran on, the
student's precision, bf16 or fp32 as `--precision` resolves for it). Models, images and
precisions are placed as the distill stage places them (channels-last, each network at its own
precision), in both steps, so that they differ in the B x K formulation only. The variants run
interleaved, round after round, so a busy machine slows them alike; the figures are medians
over `--repeats` rounds after `--warmup`.

    overhead = full / (teacher + student + queue floor)    goal <= 1.10
    speedup_vs_reference = reference / full                goal >= 1.2 at small-image shapes

Cases: `default` (the pipeline's, read from params.yaml by bench/defaults.py: teacher and
student archs, global batch, image size, K, temperatures; D 128), `imagenet` (resnet50 ->
resnet18, batch 32, 224 px, K 65,536) and, for each `--queues` size, the default networks and
images with that queue (`default_K65536`: the paper's K at small images).

    python bench/bench_step.py [--repeats 5] [--cases default imagenet] [--precision auto]
                               [--threads N] [--clock wall|cpu]

On a busy shared CPU, `--threads 1 --clock cpu` times the work itself (process CPU time, one
thread so that none counts time spent waiting for another); its seconds, and the img/s made from
them, are then per core.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from seed_core.distributed import pick_device
from seed_core.losses import seed_loss
from seed_core.models.encoder import Encoder, build_encoder
from seed_core.precision import (autocast, channels_last, resolve, to_device,
                                  uses_grad_scaler)
from seed_core.queue import EmbeddingQueue
from seed_core.train.distill import seed_step
from seed_core.train.step import backward_step

from defaults import pipeline_defaults
from machine import cpu_name

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Case:
    teacher: str
    student: str
    batch: int
    size: int
    queue: int
    embed: int = 128
    t_student: float = 0.2  # the paper's temperatures
    t_teacher: float = 1e-4


def cases_from(args: argparse.Namespace) -> dict[str, Case]:
    temperatures = {"t_student": args.t_student, "t_teacher": args.t_teacher}
    default = Case(args.teacher, args.student, args.batch, args.size, args.queue, args.embed,
                   **temperatures)
    out = {"default": default,
           "imagenet": Case(args.imagenet_teacher, args.imagenet_student, args.imagenet_batch,
                            args.imagenet_size, args.imagenet_queue, args.embed, **temperatures)}
    for k in args.queues:
        out[f"default_K{k}"] = dataclasses.replace(default, queue=k)
    unknown = [name for name in args.cases if name not in out]
    if unknown:
        raise SystemExit(f"unknown --cases {unknown}; choose from {sorted(out)}")
    return {name: out[name] for name in args.cases}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ the released formulation


class ReleasedQueue:
    """The released code's queue: a `(D, K)` buffer written column-wise, K % batch == 0."""

    def __init__(self, size: int, dim: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(0)
        self.queue = F.normalize(torch.randn(dim, size, generator=generator), dim=0).to(device)
        self.ptr = 0

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch = keys.shape[0]
        assert self.queue.shape[1] % batch == 0  # as the released code requires
        self.queue[:, self.ptr:self.ptr + batch] = keys.T
        self.ptr = (self.ptr + batch) % self.queue.shape[1]


def released_step(student: Encoder, teacher: Encoder, queue: ReleasedQueue, image: torch.Tensor,
                  optimizer: torch.optim.Optimizer, scaler, amp: Callable, teacher_amp: Callable,
                  t_student: float, t_teacher: float) -> float:
    """One step as the released SEED code takes it (`seed/builder.py`, `main.py`): its loss
    formulation under the student's autocast. The networks run as in `seed_step` (the teacher
    at its own precision, its embedding widened to float32), so that the two steps differ in
    the B x K formulation only."""
    with amp():
        s_emb = student(image)
        with torch.no_grad(), teacher_amp():
            t_emb = teacher(image).float()
        logit_stu = torch.einsum("nc,ck->nk", [s_emb, queue.queue.clone().detach()])
        logit_tea = torch.einsum("nc,ck->nk", [t_emb, queue.queue.clone().detach()])
        logit_s_p = torch.einsum("nc,nc->n", [s_emb, t_emb]).unsqueeze(-1)
        logit_t_p = torch.einsum("nc,nc->n", [t_emb, t_emb]).unsqueeze(-1)
        logit_stu = torch.cat([logit_s_p, logit_stu], dim=1) / t_student
        logit_tea = F.softmax(torch.cat([logit_t_p, logit_tea], dim=1) / t_teacher, dim=1)
        queue.dequeue_and_enqueue(t_emb)
        # the released soft_cross_entropy
        loss = -(logit_tea * F.log_softmax(logit_stu, 1)).sum() / logit_stu.shape[0]
    value = loss.item()
    optimizer.zero_grad()
    backward_step(loss, optimizer, scaler)
    return value


# ------------------------------------------------------------------ the parts


def plain_queue_floor(student_z: torch.Tensor, teacher_z: torch.Tensor, queue: torch.Tensor,
                      amp: Callable[[], contextlib.AbstractContextManager], t_student: float,
                      t_teacher: float) -> None:
    """The B x K work any SEED step must do, written plainly: both logit sets, both softmaxes,
    the soft cross-entropy and its backward (no positives, no enqueue); the teacher's logits in
    float32, the student's under its autocast."""
    with torch.no_grad():
        target = F.softmax(teacher_z @ queue.T / t_teacher, dim=1)
    with amp():
        log_p = F.log_softmax(student_z @ queue.T / t_student, dim=1)
    (-(target * log_p).sum(1).mean()).backward()


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                     device: torch.device, clock: Callable[[], float] = time.perf_counter
                     ) -> dict[str, dict]:
    """Median seconds of each function, run round-robin so that load hits all alike; on CUDA
    also the peak memory each allocates."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = clock()
            fn()
            synchronize(device)
            times[name].append(clock() - start)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
    out = {name: {"median_s": statistics.median(ts), "runs_s": [round(t, 4) for t in ts]}
           for name, ts in times.items()}
    for name, peak in peaks.items():
        out[name]["peak_gpu_mib"] = round(peak / 2**20, 1)
    return out


def bench_case(case: Case, device: torch.device, precision: str, warmup: int,
               repeats: int, clock: Callable[[], float] = time.perf_counter) -> dict:
    torch.manual_seed(0)
    # as the distill stage places them: channels-last, the teacher frozen in eval mode
    teacher = channels_last(build_encoder(case.teacher, False, case.embed).to(device).eval())
    teacher.requires_grad_(False)
    student = channels_last(build_encoder(case.student, False, case.embed).to(device))
    # each variant trains its own copy, so none sees weights another has moved
    students = {name: copy.deepcopy(student) for name in ("student", "full", "reference")}
    lr = 0.03 * case.batch / 256
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9,
                                        weight_decay=1e-4) for name, model in students.items()}
    scalers = {name: torch.amp.GradScaler("cuda") if uses_grad_scaler(device, precision)
               else None for name in students}
    # each network at the precision `precision` means for it (seed_core.precision)
    amp = lambda: autocast(device, precision, student)  # noqa: E731
    teacher_amp = lambda: autocast(device, precision, teacher)  # noqa: E731
    generator = torch.Generator().manual_seed(1)
    image = to_device(torch.randn(case.batch, 3, case.size, case.size, generator=generator),
                      device)
    queue = EmbeddingQueue(case.queue, case.embed, device)
    queue.fill_random(torch.Generator().manual_seed(0))
    released = ReleasedQueue(case.queue, case.embed, device)
    with torch.no_grad(), teacher_amp():
        teacher_z = teacher(image).float()
    fixed_z = F.normalize(torch.randn(case.batch, case.embed, generator=generator),
                          dim=1).to(device)
    weights = torch.randn(case.batch, case.embed, generator=generator).to(device)
    # the floor's queue stays fixed: the step's own queue changes as it enqueues
    floor_queue = queue.buffer.clone()

    def teacher_only() -> None:
        with torch.no_grad(), teacher_amp():
            teacher(image)

    def student_only() -> None:
        model, optimizer = students["student"], optimizers["student"]
        with amp():
            z = model(image).float()
        optimizer.zero_grad(set_to_none=True)
        backward_step((z * weights).sum() * 1e-3, optimizer, scalers["student"])

    def floor_plain() -> None:
        plain_queue_floor(fixed_z.clone().requires_grad_(True), teacher_z, floor_queue, amp,
                          case.t_student, case.t_teacher)

    def seed_loss_only() -> None:
        with amp():  # as seed_step calls it: under the student's autocast
            loss = seed_loss(fixed_z.clone().requires_grad_(True), teacher_z, floor_queue,
                             case.t_student, case.t_teacher)
        loss.backward()

    def full() -> None:
        seed_step(students["full"], teacher, queue, [image], t_student=case.t_student,
                  t_teacher=case.t_teacher, optimizer=optimizers["full"], scaler=scalers["full"],
                  gather=lambda z: z, amp=amp, teacher_amp=teacher_amp, where="bench_step",
                  with_stats=False)

    def reference() -> None:
        released_step(students["reference"], teacher, released, image,
                      optimizers["reference"], scalers["reference"], amp, teacher_amp,
                      case.t_student, case.t_teacher)

    fns = {"teacher_forward": teacher_only, "student_forward_backward_sgd": student_only,
           "queue_floor_plain": floor_plain, "seed_loss_alone": seed_loss_only, "full_step": full,
           "reference_step": reference}
    timed = time_interleaved(fns, warmup, repeats, device, clock)
    med = {name: value["median_s"] for name, value in timed.items()}
    floor = min(med["queue_floor_plain"], med["seed_loss_alone"])
    parts = med["teacher_forward"] + med["student_forward_backward_sgd"] + floor
    result = {"case": case.__dict__, "seconds": timed,
              "precision": {"teacher": resolve(precision, device, teacher),
                            "student": resolve(precision, device, student)},
              "queue_floor_s": floor, "parts_sum_s": parts,
              "overhead": med["full_step"] / parts,
              "speedup_vs_reference": med["reference_step"] / med["full_step"],
              "queue_share_of_parts": floor / parts,
              "images_per_s": {"full_step": case.batch / med["full_step"],
                               "reference_step": case.batch / med["reference_step"]}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pipeline = pipeline_defaults()
    parser.add_argument("--teacher", default=pipeline.teacher)
    parser.add_argument("--student", default=pipeline.student)
    parser.add_argument("--batch", type=int, default=pipeline.batch)
    parser.add_argument("--size", type=int, default=pipeline.size)
    parser.add_argument("--queue", type=int, default=pipeline.queue)
    parser.add_argument("--t-student", type=float, default=pipeline.t_student)
    parser.add_argument("--t-teacher", type=float, default=pipeline.t_teacher)
    parser.add_argument("--embed", type=int, default=128)
    parser.add_argument("--imagenet-teacher", default="resnet50")
    parser.add_argument("--imagenet-student", default="resnet18")
    parser.add_argument("--imagenet-batch", type=int, default=32)
    parser.add_argument("--imagenet-size", type=int, default=224)
    parser.add_argument("--imagenet-queue", type=int, default=65536)
    parser.add_argument("--queues", type=int, nargs="*", default=[65536],
                        help="extra queue sizes timed with the default networks and images")
    parser.add_argument("--cases", nargs="+", default=None,
                        help="cases to run (default: default, imagenet, default_K<q> per "
                             "--queues)")
    parser.add_argument("--precision", default="auto",
                        help="auto|fp32|bf16|fp16 (auto: fp16 AMP on CUDA, fp32 on CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice, the pipeline's)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, which a busy "
                             "shared machine inflates far less (use it with --threads 1, or "
                             "threads that wait for each other count their waiting)")
    args = parser.parse_args()
    if args.clock == "cpu" and torch.cuda.is_available():
        raise SystemExit("--clock cpu measures CPU work; on CUDA use the wall clock")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cases is None:
        args.cases = ["default", "imagenet", *(f"default_K{k}" for k in args.queues)]

    device = pick_device()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    results = {name: bench_case(case, device, args.precision, args.warmup, args.repeats,
                                CLOCKS[args.clock])
               for name, case in cases_from(args).items()}
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{cpu_name()}, {torch.get_num_threads()} threads")
    report = {"benchmark": "step", "device": str(device), "machine": machine,
              # a shared machine: the load when the run began says how busy it was
              "load_average_at_start": load_at_start,
              "torch": torch.__version__, "precision": args.precision,
              "reference_precision": ("logits under the student's autocast, as the released "
                                      "code's AMP (fp16 on CUDA; on CPU the student's "
                                      "resolved precision: the released code has no CPU "
                                      "path); networks as in seed_step"),
              "warmup": args.warmup, "repeats": args.repeats, "clock": args.clock,
              "threads": torch.get_num_threads(),
              "overhead": {name: round(r["overhead"], 3) for name, r in results.items()},
              "speedup_vs_reference": {name: round(r["speedup_vs_reference"], 3)
                                       for name, r in results.items()},
              "goals": {"overhead_max": 1.10, "speedup_min_small_images": 1.2},
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "cases": results}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
