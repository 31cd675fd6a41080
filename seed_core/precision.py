"""Mixed precision and memory layout per device and per model, chosen by measurement
(`bench/bench_levers.py`; the README's performance section has the figures).

- CUDA: fp16 autocast with a grad scaler.
- CPU: bf16 autocast for models without depthwise convolutions, on CPUs with bf16 instructions
  (`avx512_bf16`, `amx_bf16`); fp32 otherwise. On this project's 2-core AVX-512 BF16 CPU, bf16
  made ResNet steps 1.2-1.4x faster at 32 px and 1.7x at 224 px, but MobileNetV3's depthwise
  convolutions slower.
- channels-last (NHWC) memory for every convolutional model and its images, on any device:
  oneDNN's and cuDNN's preferred layout (1.1-1.2x for ResNets, 2.2-3.4x for MobileNetV3 on CPU).
- images leave the loaders as uint8 and are normalised (ImageNet mean and std) on the device, in
  `to_device`: a quarter of the bytes to copy, and no float work in the loader workers.
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMAT = torch.channels_last


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (read from /proc/cpuinfo; False elsewhere)."""
    try:
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


def has_depthwise_convs(model: nn.Module) -> bool:
    """True when the model has depthwise convolutions (MobileNet, EfficientNet...)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in model.modules())


def resolve(precision: str, device: torch.device, model: nn.Module | None = None) -> str:
    """The concrete precision (fp32, bf16 or fp16) that `precision` means for `model` on
    `device`; `auto` follows the module docstring."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    depthwise = model is not None and has_depthwise_convs(model)
    return "bf16" if device.type == "cpu" and cpu_has_bf16() and not depthwise else "fp32"


def autocast(device: torch.device, precision: str,
             model: nn.Module | None = None) -> contextlib.AbstractContextManager:
    """The autocast context of `resolve(precision, device, model)`."""
    concrete = resolve(precision, device, model)
    if concrete == "fp32":
        return contextlib.nullcontext()
    if concrete == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    dtype = torch.float16 if concrete == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def uses_grad_scaler(device: torch.device, precision: str) -> bool:
    """fp16 needs loss scaling; bf16 (same exponent range as fp32) does not."""
    return device.type == "cuda" and precision in ("auto", "fp16")


def channels_last(model: nn.Module) -> nn.Module:
    """The model with its 4-D weights in channels-last memory (in place)."""
    return model.to(memory_format=MEMORY_FORMAT)


# Teacher checkpoints (MoCo, SWAV, DINO...) were trained on ImageNet-normalised inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images `(B, 3, H, W)` -> float32 `(x / 255 - mean) / std` (ImageNet), on the
    images' device and in their memory format."""
    scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD], device=images.device)
    shift = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
                         device=images.device)
    return images.float().mul_(scale.view(1, 3, 1, 1)).add_(shift.view(1, 3, 1, 1))


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of images `(B, C, H, W)` on `device`, channels-last, ready for a model.

    uint8 batches (what the loaders give: `seed_core.data.transforms`) cross as uint8, a quarter
    of float's bytes, from pinned memory without blocking on CUDA, and are normalised there
    (`normalize_images`), the one place a batch is normalised. Float batches are taken as
    already normalised and only moved.
    """
    device = torch.device(device)
    if images.dtype != torch.uint8:
        return images.to(device, memory_format=MEMORY_FORMAT, non_blocking=True)
    if device.type == "cuda" and not images.is_pinned():
        images = images.pin_memory()
    images = images.to(device, non_blocking=True).contiguous(memory_format=MEMORY_FORMAT)
    return normalize_images(images)
