"""The colour ops and the blur of a recipe (`transforms.View`), batched on the device.

On a GPU the CPU view can stop after the crop and the flip (`View.geometry`): the batch crosses
as uint8 with each sample's colour uniforms (drawn in the loader worker from the sample's seed,
so that elastic determinism holds), and `apply_colour` runs jitter, grayscale and blur for the
whole batch on float in [0, 1]. Per sample it applies the same ops with the same
parameters and in the same order as the CPU view, the blur on the same +-3 sigma taps; it
differs only by the CPU's rounding to uint8 between ops and OpenCV's HSV in uint8:
`tests/test_device_augment.py` holds it to the CPU ops within stated tolerances.

Wired in by `data.colour_on` (`auto`: on CUDA): the stages' transforms become
`transforms.colour_later(...)`, whose views are `ColourLater` (uint8 pixels, uniforms, recipe),
the loader stacks them, and the trainer's `finish_view` moves each batch to the device and runs
`apply_colour` there before normalising.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seed_core.data.deferred import ColourLater
from seed_core.data.transforms import COLOUR_DRAWS, View, gaussian_kernel1d
from seed_core.precision import move_uint8, normalize_unit, to_device

COLOUR_ON = ("auto", "cpu", "device")


@dataclass(frozen=True)
class ColourParams:
    """Per-sample parameters of a batch of B views: `jitter`, `gray`, `blur` masks `(B,)`;
    `factors` `(B, 4)` brightness, contrast, saturation, hue shift; `order` `(B, 4)` the ops'
    indices in the order applied; `sigma` `(B,)`."""
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor


def colour_params(view: View, u: torch.Tensor) -> ColourParams:
    """The parameters `View.colour` draws from uniforms `u` `(B, >= COLOUR_DRAWS)`."""
    u = u.double()
    jitter = view.jitter
    strengths = torch.tensor([jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
                             if jitter else [0.0] * 4, dtype=torch.float64, device=u.device)
    factors = 2 * u[:, 2:6] - 1
    factors = torch.cat([1 + strengths[:3] * factors[:, :3], strengths[3:] * factors[:, 3:]], 1)
    sigma = view.sigma[0] + (view.sigma[1] - view.sigma[0]) * u[:, 11]
    return ColourParams(jitter=(u[:, 1] < view.jitter_p) & (jitter is not None),
                        factors=factors.float(), order=u[:, 6:10].argsort(dim=1),
                        gray=u[:, 0] < view.gray_p, blur=u[:, 10] < view.blur_p,
                        sigma=sigma.float())


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma `(B, 1, H, W)` of `(B, 3, H, W)`."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return (mean + (x - mean) * _per_sample(factor)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = _gray(x)
    return (gray + (x - gray) * _per_sample(factor)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` `(B,)` turns: RGB -> HSV, shift, back (torchvision's
    `adjust_hue` on float, per sample)."""
    maxc, argmax = x.max(dim=1)
    minc = x.min(dim=1).values
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(1)
    hue = torch.where(argmax == 0, (g - b) / safe,
                      torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    # back to RGB: channel k is max - chroma * clamp(min(p, 4 - p), 0, 1), p = (6 h + n_k) mod 6
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    p = (hue.unsqueeze(1) * 6 + n) % 6
    weight = torch.minimum(p, 4 - p).clamp(0, 1)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * weight


OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per sample, the four ops with `factors` `(B, 4)` in `order` `(B, 4)`."""
    x = x.clone()
    for step in range(4):
        for op in range(4):
            rows = (order[:, step] == op).nonzero().squeeze(1)
            if rows.numel():
                x[rows] = OPS[op](x[rows], factors[rows, op])
    return x


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian of `sigma` `(B,)` on `transforms.blur_taps` taps (zero-padded to
    `kernel`, one convolution for the batch), reflect padding
    (torchvision's `gaussian_blur`), as two grouped 1-D convolutions."""
    b, c, h, w = x.shape
    pad = kernel // 2
    if min(h, w) <= pad:
        return x
    weights = torch.stack([gaussian_kernel1d(kernel, float(s)) for s in sigma.cpu()])
    weights = weights.to(x.device).repeat_interleave(c, 0)  # (B * C, kernel)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), weights.view(b * c, 1, 1, kernel),
                 groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), weights.view(b * c, 1, kernel, 1),
                 groups=b * c)
    return y.view(b, c, h, w)


def apply_colour(images: torch.Tensor, view: View, u: torch.Tensor) -> torch.Tensor:
    """The colour ops and blur of `view` on a batch: `images` uint8 `(B, 3, S, S)` (cropped and
    flipped), `u` the samples' colour uniforms `(B, COLOUR_DRAWS)`. Returns float in [0, 1]."""
    if u.shape[-1] < COLOUR_DRAWS:
        raise ValueError(f"apply_colour needs {COLOUR_DRAWS} uniforms per sample, got {u.shape[-1]}")
    params = colour_params(view, u.to(images.device))
    x = images.float() / 255
    gray = params.gray.nonzero().squeeze(1)
    if view.gray_first and gray.numel():
        x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
    rows = params.jitter.nonzero().squeeze(1)
    if rows.numel():
        x[rows] = color_jitter(x[rows], params.factors[rows], params.order[rows])
    if not view.gray_first and gray.numel():
        x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
    rows = params.blur.nonzero().squeeze(1)
    if rows.numel():
        x[rows] = gaussian_blur(x[rows], view.kernel, params.sigma[rows])
    return x


def colour_on_device(setting: str, device: torch.device) -> bool:
    """Whether `data.colour_on` (`auto`, `cpu` or `device`) runs the colour ops on `device`:
    `auto` does on CUDA, where the loader's cores are what limits a 224-px run (the CPU view's
    colour and blur are most of its cost: docs/performance.md); on a CPU they would only move
    from the loader workers to the training process."""
    if setting not in COLOUR_ON:
        raise ValueError(f"data.colour_on must be one of {list(COLOUR_ON)}, got {setting!r}")
    return setting == "device" or (setting == "auto" and torch.device(device).type == "cuda")


def finish_view(batch_view: torch.Tensor | ColourLater, device: torch.device) -> torch.Tensor:
    """A collated view on `device`, normalised and channels-last, ready for a model: a uint8 batch
    as `precision.to_device` does it; a `ColourLater` batch crosses as uint8 and gets its colour
    ops and blur there (`apply_colour`) before the normalisation."""
    if not isinstance(batch_view, ColourLater):
        return to_device(batch_view, device)
    pixels = move_uint8(batch_view.pixels, device).contiguous()
    return normalize_unit(apply_colour(pixels, batch_view.view, batch_view.colour))
