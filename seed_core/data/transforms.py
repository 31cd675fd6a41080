"""Augmentation recipes, sized by `data.image_size`.

Every transform takes a decoded image, a PIL image (mode "RGB", or "L" for grayscale sources:
what `_Samples.decode` gives) or a `uint8` tensor `(C, H, W)` with C = 1 or 3, and returns a
`uint8 (3, S, S)` tensor. Normalisation (float, /255, ImageNet mean and std) happens on the
device, once per batch: `seed_core.precision.to_device`.

The ops are those of SEED's released code (torchvision transforms on PIL images, MoCo's
Gaussian blur), written for one core at 224 px (`bench/bench_loader.py` has the figures):
- the crop and resize run on the uint8 tensor, channels-last (torch's antialiased bilinear
  uint8 kernel: torchvision's `resized_crop`, 2-4x faster than PIL's resize), as does the flip;
  the eval view is torchvision's Resize + CenterCrop on uint8;
- the colour ops and the blur run on numpy uint8 arrays with OpenCV (SIMD, fixed point; 4-6x
  faster than PIL for the hue and the blur, which were most of a 224-px view): brightness and
  contrast are 256-entry lookup tables, saturation a blend with the gray image, hue a shift of
  the uint8 HSV hue as torchvision does it on PIL images;
- the blur is the Gaussian of the drawn sigma truncated at +-3 sigma within the recipe's kernel
  (10% of the side, odd): within a level of torchvision's `GaussianBlur(kernel, sigma)` at every
  size, closer to it than MoCo's PIL blur (a box approximation: 5 levels off inside, ~20 at
  the border, where PIL repeats the edge);
- an image made gray (a grayscale source, or RandomGrayscale) stays one channel until the end:
  saturation, hue and grayscale conversion are identities on it and the other ops cost a third.
All random draws come from torch's global generator (`loader.seeded` seeds it per sample), one
`torch.rand` per view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from seed_core.data.deferred import ColourLater

# One sample at a time, in loader workers that share the cores with the trainer's threads:
# OpenCV's own thread pool would only oversubscribe them (and a pool is not fork-safe).
cv2.setNumThreads(1)

Transform = Callable[[Image.Image | torch.Tensor], torch.Tensor]

# SEED's released code (`tools/utils.py`) picks the distillation augmentation by the teacher's
# SSL method; the recipes below follow it op for op, sized by `image_size` instead of 224 px.
MOCO_SCALE = (0.2, 1.0)
SWAV_SCALE = (0.14, 1.0)
SMALL_PATCH_SCALE = (0.05, 0.14)
LINEAR_SCALE = (0.08, 1.0)
BLUR_SIGMA = (0.1, 2.0)
RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop: the first of 10 draws that fits
CROP_DRAWS = 2 * CROP_ATTEMPTS + 2  # area and ratio per attempt, then the position
COLOUR_DRAWS = 12  # gray, jitter p, its 4 factors and 4 ranks for the order, blur p, sigma
DRAWS = CROP_DRAWS + COLOUR_DRAWS + 1  # uniforms per view: crop, colour, flip


def blur_kernel(size: int) -> int:
    """MoCo/SimCLR blur about 10% of the image side; odd, at least 3."""
    k = max(3, int(round(size * 0.1)))
    return k if k % 2 == 1 else k + 1


def to_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """`uint8 (C, H, W)`, C = 1 or 3, from a PIL image ("L" or "RGB"; other modes become RGB),
    a numpy `uint8 (H, W)` or `(H, W, 3)` array or a tensor; from PIL or numpy, a view of
    `(H, W, C)` memory (channels-last, what torchvision's uint8 resize is fastest on)."""
    if isinstance(image, torch.Tensor):
        return image.as_subclass(torch.Tensor)
    if isinstance(image, Image.Image):
        image = np.array(image if image.mode in ("RGB", "L") else image.convert("RGB"))
    elif not image.flags.writeable:  # torch warns on read-only memory (np.asarray of PIL)
        image = image.copy()
    pixels = torch.from_numpy(np.ascontiguousarray(image))
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def to_array(pixels: torch.Tensor) -> np.ndarray:
    """`uint8 (1|3, H, W)` -> numpy `uint8 (H, W)` or `(H, W, 3)`, what the colour ops take
    (no copy when the memory is `(H, W, C)`, as `resized_crop` leaves it)."""
    array = pixels.permute(1, 2, 0).numpy()
    return np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array)


def to_uint8_rgb(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """PIL "RGB" or "L", or `uint8 (1|3, H, W)` -> `uint8 (3, H, W)`; one channel is expanded
    (a view: the batch's collation copies it)."""
    pixels = to_tensor(image)
    return pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels


# ----------------------------------------------------------------------------- single ops
# Each op takes fixed parameters, so a test can compare it with torchvision's.


def crop_params(width: int, height: int, scale: tuple[float, float], u: Sequence[float]
                ) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` from `CROP_DRAWS` uniforms `u`:
    `(left, top, width, height)`: area and ratio from `u[2 i]`, `u[2 i + 1]` of attempt i, the
    position from `u[-2:]`; the centre crop at the clamped ratio if no attempt fits."""
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for attempt in range(CROP_ATTEMPTS):
        u_area, u_ratio = u[2 * attempt], u[2 * attempt + 1]
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return (int(u[-2] * (width - w + 1)), int(u[-1] * (height - h + 1)), w, h)
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int
                 ) -> torch.Tensor:
    """Crop `box` = `(left, top, width, height)` of `uint8 (C, H, W)` and resize it to
    `size x size`, bilinear with antialiasing: torchvision's `resized_crop`, computed by torch's
    uint8 kernel (faster than PIL's) on a channels-last copy of the box, so that the result is
    channels-last too and becomes a PIL image without a transpose."""
    left, top, w, h = box
    crop = image[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0]


def _lut(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def adjust_brightness(pixels: np.ndarray, factor: float) -> np.ndarray:
    """`pixels * factor`, clamped (torchvision's `adjust_brightness`)."""
    return cv2.LUT(pixels, _lut(np.arange(256) * factor))


def adjust_contrast(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean of the gray image (torchvision's `adjust_contrast`)."""
    mean = float(grayscale(pixels).mean())
    return cv2.LUT(pixels, _lut(mean + (np.arange(256) - mean) * factor))


def adjust_saturation(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the gray image (torchvision's `adjust_saturation`); identity on gray."""
    if pixels.ndim == 2:
        return pixels
    gray = cv2.cvtColor(grayscale(pixels), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(pixels, factor, gray, 1 - factor, 0)


def adjust_hue(pixels: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue by `shift` turns in [-0.5, 0.5] in uint8 HSV, as torchvision does it on
    PIL images (the released code's hue): OpenCV's full-range HSV, whose hue channel is 256
    steps a turn, shifted modulo 256 (the shift rounded to 1/256 turn); identity on gray."""
    if pixels.ndim == 2:
        return pixels
    hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(round(shift * 256) % 256)  # uint8 wraps: modulo a turn
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def grayscale(pixels: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, kept as one channel `(H, W)` until `to_uint8_rgb` expands it."""
    return pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)


def blur_taps(kernel: int, sigma: float) -> int:
    """Taps of the blur of `sigma` within the recipe's `kernel`: +-3 sigma (rounded up), where
    the Gaussian keeps all but 0.3% of its mass, or `kernel` where that is shorter."""
    return min(kernel, 2 * math.ceil(3 * sigma) + 1)


def gaussian_kernel1d(kernel: int, sigma: float) -> torch.Tensor:
    """The 1-D Gaussian the blur applies, `kernel` taps: the normalised Gaussian of `sigma` on
    the middle `blur_taps(kernel, sigma)` taps (torchvision's), zero outside them."""
    taps = blur_taps(kernel, sigma)
    x = torch.linspace(-(taps - 1) / 2, (taps - 1) / 2, taps, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    side = (kernel - taps) // 2
    return F.pad(pdf / pdf.sum(), (side, side)).float()


def gaussian_blur(pixels: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """Gaussian blur of `sigma`, reflect padding, on `blur_taps(kernel, sigma)` taps: within a
    level of torchvision's `gaussian_blur(kernel, sigma)` (OpenCV's fixed-point separable
    kernel). No blur where the image is no larger than half the kernel (as on the device)."""
    if min(pixels.shape[:2]) <= kernel // 2:
        return pixels
    taps = blur_taps(kernel, sigma)
    return cv2.GaussianBlur(pixels, (taps, taps), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT_101)


# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Jitter:
    """ColorJitter strengths: factors in [1 - x, 1 + x] for brightness, contrast and
    saturation, a hue shift in [-hue, hue] turns; the four applied in a random order."""
    brightness: float
    contrast: float
    saturation: float
    hue: float


MOCO_V2_JITTER = Jitter(0.4, 0.4, 0.4, 0.1)
MOCO_V1_JITTER = Jitter(0.4, 0.4, 0.4, 0.4)


def color_jitter(pixels: np.ndarray, jitter: Jitter, u: Sequence[float]) -> np.ndarray:
    """torchvision's `ColorJitter(jitter)` with 8 uniforms `u`: 4 factors, then 4 whose ranks
    give the order of the ops (a uniform random permutation)."""
    ops = (lambda im, v: adjust_brightness(im, 1 + jitter.brightness * (2 * v - 1)),
           lambda im, v: adjust_contrast(im, 1 + jitter.contrast * (2 * v - 1)),
           lambda im, v: adjust_saturation(im, 1 + jitter.saturation * (2 * v - 1)),
           lambda im, v: adjust_hue(im, jitter.hue * (2 * v - 1)))
    for i in sorted(range(4), key=lambda j: u[4 + j]):
        pixels = ops[i](pixels, u[i])
    return pixels


@dataclass(frozen=True)
class View:
    """One augmented view: RandomResizedCrop(size, scale), then the colour ops (jitter with
    probability `jitter_p`, grayscale with probability `gray_p`, before the jitter when
    `gray_first`), Gaussian blur with probability `blur_p` (sigma uniform in `sigma`, kernel
    `blur_kernel(size)`), horizontal flip with probability 0.5. Returns `uint8 (3, S, S)`."""
    size: int
    scale: tuple[float, float]
    jitter: Jitter | None = None
    jitter_p: float = 0.0
    gray_p: float = 0.0
    gray_first: bool = False
    blur_p: float = 0.0
    sigma: tuple[float, float] = BLUR_SIGMA

    @property
    def kernel(self) -> int:
        return blur_kernel(self.size)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        pixels = to_tensor(image)
        u = torch.rand(DRAWS, dtype=torch.float64).tolist()
        crop, u = u[:CROP_DRAWS], u[CROP_DRAWS:]
        box = crop_params(pixels.shape[-1], pixels.shape[-2], self.scale, crop)
        pixels = self.colour(resized_crop(pixels, box, self.size), u)
        if u[12] < 0.5:
            pixels = pixels.flip(-1)
        return to_uint8_rgb(pixels)

    def geometry(self, image: Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU part when the colour ops and the blur run on the device: the same crop and
        flip as `__call__` from the same draws, and the colour uniforms `(COLOUR_DRAWS,)` float64
        that `device_augment.apply_colour` takes (the flip commutes with the colour ops and the
        symmetric blur, so it may come first)."""
        pixels = to_tensor(image)
        u = torch.rand(DRAWS, dtype=torch.float64)
        box = crop_params(pixels.shape[-1], pixels.shape[-2], self.scale,
                          u[:CROP_DRAWS].tolist())
        pixels = resized_crop(pixels, box, self.size)
        if u[CROP_DRAWS + 12] < 0.5:
            pixels = pixels.flip(-1)
        return to_uint8_rgb(pixels), u[CROP_DRAWS:CROP_DRAWS + COLOUR_DRAWS]

    def colour(self, pixels: torch.Tensor, u: Sequence[float]) -> torch.Tensor:
        """The colour ops and the blur of `uint8 (C, S, S)` given the view's uniforms after the
        crop's: `u[0]` grayscale, `u[1]` jitter, `u[2:10]` its factors and order, `u[10]` blur,
        `u[11]` its sigma (`device_augment` draws the same from the same uniforms)."""
        gray, jitter, blur = (u[0] < self.gray_p, self.jitter is not None and u[1] < self.jitter_p,
                              u[10] < self.blur_p)
        if not (gray or jitter or blur):
            return pixels
        image = to_array(pixels)  # the colour ops and the blur run on numpy arrays (OpenCV)
        if gray and self.gray_first:
            image = grayscale(image)
        if jitter:
            image = color_jitter(image, self.jitter, u[2:10])
        if gray and not self.gray_first:
            image = grayscale(image)
        if blur:
            image = gaussian_blur(image, self.kernel, self.sigma[0] +
                                  (self.sigma[1] - self.sigma[0]) * u[11])
        return to_tensor(image)


class GeometryView:
    """The CPU part of `view` when its colour ops and blur run on the device (`data.colour_on`):
    the same crop and flip from the same draws, returned as a `ColourLater`."""

    def __init__(self, view: View) -> None:
        self.view = view

    def __call__(self, image: Image.Image | torch.Tensor) -> ColourLater:
        return ColourLater(*self.view.geometry(image), self.view)


def _mocov2_view(size: int, scale: tuple[float, float]) -> View:
    """MoCo-v2's colour ops, which SEED also keeps for SwAV teachers ("not strengthened"):
    jitter 0.4/0.4/0.4/0.1 with p = 0.8, grayscale p = 0.2, Gaussian blur p = 0.5."""
    return View(size, scale, MOCO_V2_JITTER, jitter_p=0.8, gray_p=0.2, blur_p=0.5)


def moco_v2_transform(image_size: int) -> View:
    """MoCo-v2 teachers (and MLP-head MoCo): crop 0.2-1, MoCo-v2 colour ops, flip."""
    return _mocov2_view(image_size, MOCO_SCALE)


def moco_v1_transform(image_size: int) -> View:
    """MoCo-v1 (InstDisc) teachers: crop 0.2-1, grayscale p = 0.2 first, then jitter
    0.4/0.4/0.4/0.4 every time, no blur, flip."""
    return View(image_size, MOCO_SCALE, MOCO_V1_JITTER, jitter_p=1.0, gray_p=0.2,
                gray_first=True)


def simclr_transform(image_size: int) -> View:
    """SimCLR teachers, as SEED's code does it: the MoCo-v1 recipe (no blur, jitter always)."""
    return moco_v1_transform(image_size)


def swav_transform(image_size: int) -> View:
    """SwAV teachers: crop 0.14-1, then MoCo-v2's colour ops (SEED does not use SwAV's
    strengthened 0.8/0.8/0.8/0.2 jitter), flip."""
    return _mocov2_view(image_size, SWAV_SCALE)


def small_patch_transform(patch_size: int) -> View:
    """SEED's small patches (SwAV teachers' multi-crop): crop 0.05-0.14 to `patch_size` (96 px
    at 224), then the SwAV recipe's colour ops, flip."""
    return _mocov2_view(patch_size, SMALL_PATCH_SCALE)


# recipe name -> builder; the teacher format decides which one distillation uses
RECIPES: dict[str, Callable[[int], View]] = {
    "moco_v2": moco_v2_transform,
    "moco_v1": moco_v1_transform,
    "simclr": simclr_transform,
    "swav": swav_transform,
}


def ssl_transform(recipe: str, image_size: int) -> View:
    """The whole CPU view of recipe `recipe` (a key of `RECIPES`) at `image_size`: crop, colour,
    blur and flip. Returns `uint8 (3, S, S)`, to be normalised on the device
    (`seed_core.precision.to_device`)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; known: {sorted(RECIPES)}")
    return RECIPES[recipe](image_size)


class EvalTransform:
    """Resize + centre crop (ratio 0.875, as MoCo's val) from 96 px up; plain resize below,
    where a centre crop would cut most of a 28-32 px object. Returns `uint8 (3, S, S)`."""

    def __init__(self, image_size: int) -> None:
        self.size = image_size

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        # imported here: torchvision costs ~1.1 s of start-up, and only this view uses it (the
        # stages that only train a linear probe on cached features never call it)
        import torchvision.transforms.v2.functional as TF

        pixels = to_tensor(image)
        if self.size >= 96:
            pixels = TF.center_crop(TF.resize(pixels, int(round(self.size / 0.875)),
                                              antialias=True), [self.size, self.size])
        else:
            pixels = TF.resize(pixels, [self.size, self.size], antialias=True)
        return to_uint8_rgb(pixels)


def eval_transform(image_size: int) -> EvalTransform:
    """The evaluation view at `image_size` (`EvalTransform`): `uint8 (3, S, S)`."""
    return EvalTransform(image_size)


def linear_train_transform(image_size: int) -> View:
    """MoCo linear-evaluation training view: RandomResizedCrop (0.08-1) + flip."""
    return View(image_size, LINEAR_SCALE)


class MultiView:
    """Apply several transforms to one image: `[view_0, view_1, ...]`."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Image.Image | torch.Tensor) -> list[torch.Tensor | ColourLater]:
        image = to_tensor(image)  # once, not per view
        return [t(image) for t in self.transforms]


def colour_later(transform: View | MultiView) -> GeometryView | MultiView:
    """`transform` (a recipe's view, or several) with the colour ops and the blur of every view
    left to the device: each view gives a `ColourLater` instead of its finished pixels."""
    if isinstance(transform, MultiView):
        return MultiView([colour_later(t) for t in transform.transforms])
    if not isinstance(transform, View):
        raise TypeError(f"colour_later takes a View or a MultiView of them, not {transform!r}")
    return GeometryView(transform)
