"""Mixed precision per device: fp16 AMP with a grad scaler on CUDA, fp32 (or bf16) on CPU."""

from __future__ import annotations

import contextlib

import torch


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


