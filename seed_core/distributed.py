"""Process-group glue: the only core module (with tracking) that imports torch.distributed.

Everything runs without a process group too (plain `python stages/x.py`, unit tests): every
collective here is guarded, and the core receives them as plain callables.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def pick_device(local_rank: int = 0) -> torch.device:
    """CUDA when present (one GPU per local rank), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def compute_threads(cores: int, local_world: int, loader_workers: int) -> int:
    """Torch threads for one rank: its share of the machine's cores, less the cores its loader
    workers keep busy. A rank that starts as many threads as there are cores beside its workers
    oversubscribes them: on 2 cores, one distillation step with SEED's small views took 0.81 s
    with 1 compute thread and 4.1 s with 2, beside one loader worker."""
    return max(1, cores // max(1, local_world) - loader_workers)


def setup(timeout_s: float = 1800.0, loader_workers: int = 0) -> Runtime:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    NCCL on CUDA, gloo on CPU. torchrun sets OMP_NUM_THREADS=1; each local rank gets its share of
    the cores instead, less its `loader_workers` (`compute_threads`; SEED_NUM_THREADS overrides).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    threads = int(os.environ.get("SEED_NUM_THREADS", "0")) or compute_threads(
        os.cpu_count() or 1, local_world, loader_workers)
    torch.set_num_threads(threads)
    log.info("%d compute thread(s) per rank (%d loader worker(s), %d core(s), %d local rank(s))",
             threads, loader_workers, os.cpu_count() or 1, local_world)
    # whenever torchrun launched us, even as one process: a one-GPU run then initialises NCCL
    # as a multi-GPU run does (bench/gpu_check.sh relies on it); the collectives short-circuit
    # at world size 1
    launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if launched and not is_initialized():
        # on CUDA, gloo beside NCCL: the few collectives on CPU tensors (loss means, bad-sample
        # counts, the stop check) need it; NCCL alone has no CPU backend
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined the %s process group on %s", dist.get_rank(), world,
                 backend, device)
    return Runtime(rank=rank(), world_size=world_size(), local_rank=local_rank, device=device)


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@torch.no_grad()
def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks along dim 0, in rank order (no grad)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable (the backward sums the gradients too)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    return dist_fn.all_reduce(tensor, op=dist.ReduceOp.SUM)


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' `value`s (every rank must call it)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (all must call with the same keys): with equal
    per-rank batches, the mean of the ranks' batch means is the global-batch mean."""
    if not is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def gather_to_main(obj: object) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere): one mechanism for merging
    per-rank results (features, embeddings) that works across nodes without a shared disk."""
    if not is_initialized():
        return [obj]
    out: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: object) -> list:
    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` stacked in rank order `(W, ...)`, differentiable (the backward
    returns each rank its slice of the gradient)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor[None]
    return torch.stack(dist_fn.all_gather(tensor))


def combine_moments(counts: torch.Tensor, means: torch.Tensor, m2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and sum of squared deviations of a union of parts `(W,)`, `(W, C)`,
    `(W, C)` (Chan et al.'s pairwise formula): exact, without the cancellation of
    E[x^2] - E[x]^2 that small late-layer batches suffer."""
    total = counts.sum()
    mean = (counts[:, None] * means).sum(0) / total
    spread = (m2 + counts[:, None] * (means - mean) ** 2).sum(0)
    return total, mean, spread


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch of all ranks.

    torch's SyncBatchNorm only runs on CUDA-like devices; this is the same computation for any
    device (gloo on CPU), so an N-rank step equals a 1-rank step on the concatenated batch. Each
    rank's mean and squared deviations are combined exactly (`combine_moments`): a one-pass
    E[x^2] - E[x]^2 differed from torch's BatchNorm by enough that MoCo's feedback (momentum
    encoder, queue) amplified it to 1e-3 in the loss within 16 steps of the stage tests.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        xf = x.float()
        local_mean = xf.mean(dims)
        local_m2 = ((xf - local_mean.view([1, c] + [1] * (x.dim() - 2))) ** 2).sum(dims)
        count = torch.full((1,), x.numel() / c, device=x.device, dtype=torch.float32)
        parts = all_gather_cat(torch.cat([count, local_mean, local_m2]))
        n, mean, m2 = combine_moments(parts[:, 0], parts[:, 1:c + 1], parts[:, c + 1:])
        var = m2 / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None is torch's cumulative average, as _BatchNorm.forward does it
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(m2.detach() / (n - 1), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class GlobalBatchNormAct2d(GlobalBatchNorm):
    """`GlobalBatchNorm`, then the dropout and activation that timm's `BatchNormAct2d` applies
    inside the module (MobileNetV3, EfficientNet, RegNet...): a plain BatchNorm in its place
    would silently remove them."""

    def __init__(self, num_features: int, eps: float, momentum: float | None, affine: bool,
                 track_running_stats: bool, drop: nn.Module, act: nn.Module) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class UnknownBatchNormError(TypeError):
    """A BatchNorm subclass whose own behaviour a global-statistics conversion would lose."""


def _batchnorm_kinds() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(plain BatchNorms, BatchNorms that carry an activation): the classes the conversion
    knows. timm's `SplitBatchNorm2d` (AugMix's auxiliary statistics), the lazy and the
    quantized BatchNorms are not among them."""
    from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct

    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, GlobalBatchNorm)
    with_act = (BatchNormAct2d, SyncBatchNormAct, GlobalBatchNormAct2d)
    return plain, with_act


def check_batchnorms(module: nn.Module) -> None:
    """Raise `UnknownBatchNormError` naming every BatchNorm subclass in `module` that the
    conversion does not know (it must never be swapped for a plain BatchNorm)."""
    plain, with_act = _batchnorm_kinds()
    known = set(plain) | set(with_act)
    unknown = sorted({f"{name} ({type(m).__module__}.{type(m).__qualname__})"
                      for name, m in module.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in known})
    if unknown:
        raise UnknownBatchNormError(
            f"BatchNorm subclasses with no global-statistics version: {unknown[:5]}; train this "
            f"model with one process (nproc: 1), or with distill.sync_bn: false (each rank then "
            f"normalises its own part of the batch)")


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BN over the global batch, each module keeping its own behaviour (the activation of
    timm's BatchNormAct2d): timm's converter on CUDA, `GlobalBatchNorm(Act2d)` elsewhere. An
    unknown BatchNorm subclass is an error, never a silent swap."""
    check_batchnorms(module)
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm

        return timm_convert_sync_batchnorm(module)
    return _swap_batchnorm(module, _batchnorm_kinds())


def _swap_batchnorm(module: nn.Module, kinds: tuple[tuple[type, ...], tuple[type, ...]]
                    ) -> nn.Module:
    _, with_act = kinds
    if isinstance(module, (GlobalBatchNorm, GlobalBatchNormAct2d)):
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        args = (module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats)
        if isinstance(module, with_act):
            new: GlobalBatchNorm = GlobalBatchNormAct2d(*args, drop=module.drop, act=module.act)
        else:
            new = GlobalBatchNorm(*args)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        if module.track_running_stats:
            new.running_mean.copy_(module.running_mean)
            new.running_var.copy_(module.running_var)
            new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _swap_batchnorm(child, kinds))
    return module


def wrap_ddp(module: nn.Module, runtime: Runtime, sync_bn: bool = True) -> nn.Module:
    """DDP around a trainable module when several ranks run; the module itself otherwise.

    With `sync_bn`, BatchNorm statistics cover the global batch (call `convert_sync_batchnorm`
    before building any copy of the module, e.g. MoCo's key encoder); buffers then agree on every
    rank by construction and need no broadcast.
    """
    if runtime.world_size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=not sync_bn)
