"""Mixed precision and memory layout per device and per model, chosen by measurement
(`bench/bench_levers.py`; docs/performance.md has the figures).

- CUDA: fp16 autocast with a grad scaler.
- CPU: bf16 autocast for models without depthwise convolutions, on CPUs with bf16 instructions
  (`avx512_bf16`, `amx_bf16`); fp32 otherwise. On this project's 2-core AVX-512 BF16 CPU, bf16
  made ResNet steps 1.2-1.4x faster at 32 px and 1.7x at 224 px, but MobileNetV3's depthwise
  convolutions slower.
- bf16 training on CPU also needs every strided convolution to see more than one pixel: in
  torch 2.14.1 (oneDNN 3.12, this project's AVX-512 CPU) the bf16 weight gradient of a 3x3,
  stride-2 convolution over a 1x1 input is read from uninitialised memory (relative error 0.1 to
  1e20, or inf, and different on every run; forward and input gradient are right; fp32 is right).
  A ResNet without `small_images` reaches a 1x1 map before layer4 at 16 px. `training_precision`
  trains such a model in fp32 (`auto`) or refuses an explicit `bf16`.
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

import logging
from typing import Sequence

import torch
from torch import nn

from seed_core.config import ConfigError

log = logging.getLogger(__name__)

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


def one_pixel_strided_convs(model: nn.Module, image_size: int) -> list[str]:
    """Names of the `Conv2d` layers of `model` with a stride and a kernel over 1 that see a
    1x1 input when the model reads `(3, image_size, image_size)` images (module docstring).

    Found by one forward pass of a blank image in eval mode, on the model's device; every module's
    train/eval mode is restored, and no running statistic changes.
    """
    found: list[str] = []

    def watch(name: str):
        def hook(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...]) -> None:
            height, width = inputs[0].shape[-2:]
            if min(height, width) == 1 and max(module.stride) > 1 and max(module.kernel_size) > 1:
                found.append(name)
        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(watch(name)) for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d)]
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return found


def training_precision(precision: str, device: torch.device, model: nn.Module,
                       image_sizes: Sequence[int], key: str) -> str:
    """The concrete precision to *train* `model` in on `device`: `resolve`'s, except bf16 on CPU
    when a strided convolution would see a 1x1 input at one of `image_sizes` (module docstring):
    `auto` then means fp32, and an explicit `bf16` (params key `key`) is an error naming the
    layers."""
    concrete = resolve(precision, device, model)
    if concrete != "bf16" or torch.device(device).type != "cpu":
        return concrete
    layers = sorted({name for size in image_sizes for name in one_pixel_strided_convs(model, size)})
    if not layers:
        return concrete
    shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
    why = (f"{shown} see a 1x1 input at {min(image_sizes)} px, where torch's CPU bf16 weight "
           f"gradient of a strided convolution is garbage")
    if precision == "bf16":
        raise ConfigError(f"params: {key!r} = 'bf16' cannot train {type(model).__name__} on "
                          f"CPU: {why}; use fp32 (or auto), a larger image size, or small_images: "
                          f"true", key)
    log.warning("training in fp32, not bf16: %s", why)
    return "fp32"


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
    return normalize_images(move_uint8(images, device))


def move_uint8(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uint8 batch on `device`, channels-last: from pinned memory without blocking on CUDA."""
    device = torch.device(device)
    if device.type == "cuda" and not images.is_pinned():
        images = images.pin_memory()
    return images.to(device, non_blocking=True).contiguous(memory_format=MEMORY_FORMAT)


def normalize_unit(images: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] `(B, 3, H, W)` -> `(x - mean) / std` (ImageNet), channels-last: the
    end of a view whose colour ops ran on the device (`device_augment.finish_view`)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return ((images - mean) / std).contiguous(memory_format=MEMORY_FORMAT)
