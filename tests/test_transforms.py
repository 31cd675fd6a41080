"""The distillation augmentations are SEED's released recipes (`tools/utils.py`), chosen by the
teacher's SSL method: each recipe's parameters are read off the built view; each op is compared
with torchvision's float op (the 805c760 recipe) at fixed parameters, within a stated tolerance
in levels of 255 that a broken op (wrong hue direction, an op left out, a wrong sigma) crosses;
the views run on RGB and grayscale images and come out uint8, normalised on the device once."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF1
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from seed_core.data import transforms as A
from seed_core.data.transforms import (RECIPES, Jitter, MultiView, View, eval_transform,
                                       linear_train_transform, small_patch_transform,
                                       ssl_transform)
from seed_core.precision import IMAGENET_MEAN, IMAGENET_STD, to_device

# tolerances in levels of 255 against torchvision's float ops: (max abs, mean abs)
POINT_OPS = (1, 0.6)  # brightness, contrast, saturation, grayscale: rounding only
# uint8 HSV (OpenCV's, as the released code's PIL hue) against float HSV: hue in 1/256 turn,
# saturation in 1/255: up to 7 levels on saturated pixels, 0.36 on average (measured)
HUE = (8, 0.5)
# against what the released code ran (torchvision's hue on PIL images: PIL's own uint8 HSV, the
# shift truncated to 1/255 turn): up to 14 levels, 0.8 on average (measured)
RELEASED_HUE = (16, 1.0)
JITTER = (16, 1.0)  # four ops in a row, hue among them


def levels(ours, reference: torch.Tensor) -> tuple[int, float]:
    """(max, mean) absolute difference in levels of 255; `reference` is float in [0, 1]."""
    diff = (A.to_tensor(ours).float() - reference.float() * 255).abs()
    return int(diff.max().round()), float(diff.mean())


def within(ours, reference: torch.Tensor, tolerance: tuple[float, float]) -> bool:
    max_abs, mean_abs = levels(ours, reference)
    return max_abs <= tolerance[0] and mean_abs <= tolerance[1]


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photo (matplotlib ships it), at a crop's size."""
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return Image.open(path).convert("RGB").resize((160, 160), Image.BILINEAR)


@pytest.fixture(scope="module")
def rgb(photo: Image.Image) -> np.ndarray:
    """The photo as the colour ops take it: `uint8 (H, W, 3)`."""
    return np.array(photo)


@pytest.fixture(scope="module")
def unit(photo: Image.Image) -> torch.Tensor:
    """The photo as float `(3, H, W)` in [0, 1]: what the 805c760 recipe's colour ops saw."""
    return A.to_tensor(photo).float() / 255


# ----------------------------------------------------------------------------- recipes

MOCO_V2 = dict(jitter=Jitter(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, gray_first=False,
               blur_p=0.5, sigma=(0.1, 2.0))
MOCO_V1 = dict(jitter=Jitter(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2, gray_first=True,
               blur_p=0.0)
EXPECTED = {
    "moco_v2": dict(scale=(0.2, 1.0), **MOCO_V2),
    "moco_v1": dict(scale=(0.2, 1.0), **MOCO_V1),
    "simclr": dict(scale=(0.2, 1.0), **MOCO_V1),
    # SEED keeps MoCo-v2's jitter for SwAV teachers, not SwAV's strengthened 0.8/0.8/0.8/0.2
    "swav": dict(scale=(0.14, 1.0), **MOCO_V2),
}


def parameters(view: View, keys) -> dict:
    return {k: getattr(view, k) for k in keys}


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_parameters(recipe: str) -> None:
    view = ssl_transform(recipe, 32)
    assert view.size == 32
    assert parameters(view, EXPECTED[recipe]) == EXPECTED[recipe]


def test_every_recipe_is_tested_and_unknown_names_fail() -> None:
    assert set(RECIPES) == set(EXPECTED)
    with pytest.raises(ValueError, match=r"unknown augmentation recipe 'byol'; known: \["):
        ssl_transform("byol", 32)


def test_small_patch_recipe_is_swavs_colour_at_small_scale() -> None:
    view = small_patch_transform(14)
    assert (view.size, view.scale) == (14, (0.05, 0.14))
    assert parameters(view, MOCO_V2) == MOCO_V2
    assert linear_train_transform(32) == View(32, (0.08, 1.0))  # crop + flip, no colour


def test_blur_kernel_follows_the_image_size() -> None:
    assert ssl_transform("moco_v2", 224).kernel == 23  # SimCLR: 10% of the side, odd
    assert ssl_transform("swav", 32).kernel == 3


# ----------------------------------------------------------------------------- single ops


def test_crop_is_torchvisions_resized_crop(photo: Image.Image) -> None:
    pixels = A.to_tensor(photo)
    for box in [(10, 20, 100, 80), (0, 0, 160, 160), (50, 7, 31, 90)]:
        ours = A.resized_crop(pixels, box, 64)
        reference = TF.resized_crop(pixels.contiguous(), box[1], box[0], box[3], box[2],
                                    [64, 64], antialias=True)
        assert torch.equal(ours, reference)


def test_crop_boxes_follow_torchvisions_distribution() -> None:
    """Ours from 2,000 draws against torchvision's `get_params` from 2,000: the same law of the
    area fraction and aspect ratio (means within 0.02), inside the bounds, and the fallback."""
    generator = torch.Generator().manual_seed(0)
    ours = [A.crop_params(500, 375, (0.2, 1.0), torch.rand(A.CROP_DRAWS, dtype=torch.float64,
                                                            generator=generator).tolist())
            for _ in range(2000)]
    torch.manual_seed(0)
    image = torch.zeros(3, 375, 500)
    theirs = [T.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])
              for _ in range(2000)]
    ours_stats = np.array([(w * h / (500 * 375), w / h, (x + w / 2) / 500) for x, y, w, h in ours])
    theirs_stats = np.array([(w * h / (500 * 375), w / h, (x + w / 2) / 500)
                             for y, x, h, w in theirs])
    np.testing.assert_allclose(ours_stats.mean(0), theirs_stats.mean(0), atol=0.02)
    assert all(0 <= x and x + w <= 500 and 0 <= y and y + h <= 375 for x, y, w, h in ours)
    # no draw fits a 1-px-high strip: torchvision's centre crop at the clamped ratio
    assert A.crop_params(400, 10, (0.9, 1.0), [0.5] * A.CROP_DRAWS) == (193, 0, 13, 10)


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_point_ops_match_torchvision(rgb, unit, factor: float) -> None:
    assert within(A.adjust_brightness(rgb, factor), TF.adjust_brightness(unit, factor),
                  POINT_OPS)
    assert within(A.adjust_contrast(rgb, factor), TF.adjust_contrast(unit, factor), POINT_OPS)
    assert within(A.adjust_saturation(rgb, factor), TF.adjust_saturation(unit, factor),
                  POINT_OPS)
    assert within(A.grayscale(rgb), TF.rgb_to_grayscale(unit), POINT_OPS)


@pytest.mark.parametrize("shift", [-0.4, -0.1, 0.05, 0.1, 0.3, 0.4])
def test_hue_matches_torchvision(photo, rgb, unit, shift: float) -> None:
    ours = A.adjust_hue(rgb, shift)
    assert within(ours, TF.adjust_hue(unit, shift), HUE)
    released = A.to_tensor(TF1.adjust_hue(photo, shift)).float() / 255
    assert within(ours, released, RELEASED_HUE)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_blur_matches_torchvisions_gaussian(rgb, unit, sigma: float) -> None:
    """Up to rounding, borders included: the +-3 sigma truncation drops < 0.3% of the mass."""
    reference = TF.gaussian_blur(unit, [23, 23], [sigma, sigma])
    assert within(A.gaussian_blur(rgb, 23, sigma), reference, POINT_OPS)
    # a kernel shorter than +-3 sigma (small images): the truncated Gaussian
    short = A.gaussian_blur(rgb, 3, sigma)
    assert within(short, TF.gaussian_blur(unit, [3, 3], [sigma, sigma]), POINT_OPS)
    gray = A.gaussian_blur(rgb[..., 1].copy(), 23, sigma)  # one channel, as a gray view
    assert within(gray, reference[1:2], POINT_OPS)


def test_blur_kernel_is_torchvisions_within_three_sigma() -> None:
    for kernel, sigma, taps in [(23, 0.1, 3), (23, 1.0, 7), (23, 2.0, 13), (3, 2.0, 3)]:
        assert A.blur_taps(kernel, sigma) == taps
        weights = A.gaussian_kernel1d(kernel, sigma)
        side = (kernel - taps) // 2
        assert weights.shape == (kernel,) and not weights[:side].any()
        x = np.arange(taps) - (taps - 1) / 2
        expected = np.exp(-x ** 2 / (2 * sigma ** 2))
        np.testing.assert_allclose(weights[side:kernel - side], expected / expected.sum(),
                                   rtol=1e-6)


def test_jitter_matches_torchvision_in_the_drawn_order(rgb, unit) -> None:
    u = [0.9, 0.1, 0.3, 0.8, 0.7, 0.2, 0.9, 0.1]  # factors, then ranks: hue, contrast, b., s.
    jitter = Jitter(0.4, 0.4, 0.4, 0.1)
    b, c, s, h = 1.32, 0.68, 0.84, 0.06
    reference = TF.adjust_saturation(TF.adjust_brightness(
        TF.adjust_contrast(TF.adjust_hue(unit, h), c), b), s)
    assert within(A.color_jitter(rgb, jitter, u), reference, JITTER)


def test_a_broken_op_crosses_the_tolerance(photo, rgb, unit) -> None:
    """Each tolerance above rejects a plausible bug."""
    assert not within(A.adjust_hue(rgb, -0.1), TF.adjust_hue(unit, 0.1), HUE)  # direction
    assert not within(photo, TF.adjust_hue(unit, 0.05), HUE)  # hue left out
    released = A.to_tensor(TF1.adjust_hue(photo, 0.1)).float() / 255
    assert not within(A.adjust_hue(rgb, -0.1), released, RELEASED_HUE)
    assert not within(A.adjust_saturation(rgb, 1.4), TF.adjust_saturation(unit, 1.3),
                      POINT_OPS)  # a factor off by 0.1
    assert not within(photo, TF.adjust_contrast(unit, 0.6), POINT_OPS)  # contrast left out
    reference = TF.gaussian_blur(unit, [23, 23], [1.0, 1.0])
    assert not within(A.gaussian_blur(rgb, 23, 0.5), reference, POINT_OPS)  # sigma / 2
    assert not within(A.gaussian_blur(rgb, 23, 0.9), reference, POINT_OPS)  # sigma off by 10%
    u = [0.9, 0.1, 0.3, 0.8, 0.7, 0.2, 0.9, 0.1]
    other_order = TF.adjust_hue(TF.adjust_saturation(TF.adjust_brightness(
        TF.adjust_contrast(unit, 0.68), 1.32), 0.84), 0.06)
    assert not within(A.color_jitter(rgb, Jitter(0.4, 0.4, 0.4, 0.1), u), other_order, JITTER)


def test_eval_view_is_the_old_resize_and_centre_crop(photo: Image.Image) -> None:
    pixels = A.to_tensor(photo).contiguous()
    old = T.Compose([T.Resize(int(round(112 / 0.875)), antialias=True), T.CenterCrop(112)])
    assert torch.equal(eval_transform(112)(photo), old(pixels))
    gray = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    assert torch.equal(eval_transform(32)(gray),
                       T.Resize((32, 32), antialias=True)(gray).expand(3, -1, -1))


# ----------------------------------------------------------------------------- whole views


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
@pytest.mark.parametrize("channels", [1, 3])
def test_recipes_run_on_gray_and_rgb(recipe: str, channels: int) -> None:
    image = torch.randint(0, 256, (channels, 40, 36), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    views = MultiView([ssl_transform(recipe, 32), small_patch_transform(12)])(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32), (3, 12, 12)]
    assert all(v.dtype == torch.uint8 for v in views)
    if channels == 1:  # a gray source stays gray
        assert all(torch.equal(v[0], v[1]) and torch.equal(v[0], v[2]) for v in views)
    torch.manual_seed(0)
    assert torch.equal(ssl_transform(recipe, 32)(image), views[0])  # seeded: reproducible
    torch.manual_seed(1)
    assert not torch.equal(ssl_transform(recipe, 32)(image), views[0])  # draws differ


def test_pil_and_tensor_inputs_give_the_same_view(photo: Image.Image) -> None:
    for transform in (ssl_transform("moco_v2", 64), eval_transform(96)):
        torch.manual_seed(3)
        from_pil = transform(photo)
        torch.manual_seed(3)
        assert torch.equal(from_pil, transform(A.to_tensor(photo).contiguous()))


def test_op_frequencies_follow_the_recipe(photo: Image.Image) -> None:
    """Over 400 views each (binomial, 4 sigma): grayscale in 0.2 of them, flips in half."""
    small = photo.resize((40, 40))
    plain = A.resized_crop(A.to_tensor(small), (0, 0, 40, 40), 24)  # a full crop: scale 1
    torch.manual_seed(0)
    gray = sum(bool(torch.equal(v[0], v[1]) and torch.equal(v[1], v[2]))
               for v in (View(24, (1.0, 1.0), gray_p=0.2)(small) for _ in range(400)))
    flipped = sum(bool(torch.equal(View(24, (1.0, 1.0))(small), plain.flip(-1)))
                  for _ in range(400))
    assert abs(gray - 80) <= 4 * (400 * 0.2 * 0.8) ** 0.5
    assert abs(flipped - 200) <= 4 * (400 * 0.25) ** 0.5


def test_batches_are_normalised_once_on_the_device() -> None:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = torch.stack([eval_transform(4)(torch.full((1, 4, 4), 255, dtype=torch.uint8)),
                          eval_transform(4)(torch.zeros(3, 5, 5, dtype=torch.uint8))])
    on_device = to_device(images, torch.device("cpu"))
    assert on_device.dtype == torch.float32
    assert on_device.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(on_device, torch.cat([((1 - mean) / std).expand(1, 3, 4, 4),
                                                     (-mean / std).expand(1, 3, 4, 4)]))
    # a float batch is taken as normalised already: moved, not normalised a second time
    torch.testing.assert_close(to_device(on_device, torch.device("cpu")), on_device)
