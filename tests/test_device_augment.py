"""The batched colour ops and blur (`device_augment`) against the CPU view's ops, on CPU tensors:
op by op at fixed parameters, then whole batches with each sample's own uniforms, within the
tolerances of `test_transforms.py`, which a wrong hue direction crosses."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image

from seed_core.data import device_augment as D
from seed_core.data import transforms as A
from test_transforms import HUE, POINT_OPS, within

# whole views: up to five ops, each rounded to uint8 on the CPU, PIL's blur among them; the hue
# of a nearly gray pixel moves with one level of rounding upstream, hence the max
VIEW = (24, 1.5)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return Image.open(path).convert("RGB").resize((96, 96), Image.BILINEAR)


@pytest.fixture(scope="module")
def batch(photo: Image.Image) -> torch.Tensor:
    """The photo as a float batch `(1, 3, H, W)` in [0, 1]."""
    return A.to_tensor(photo).float()[None] / 255


def one(values: float) -> torch.Tensor:
    return torch.tensor([values])


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_point_ops_match_the_cpu_ops(photo, batch, factor: float) -> None:
    for cpu, device in [(A.adjust_brightness, D.adjust_brightness),
                        (A.adjust_contrast, D.adjust_contrast),
                        (A.adjust_saturation, D.adjust_saturation)]:
        assert within(cpu(photo, factor), device(batch, one(factor))[0], POINT_OPS)


@pytest.mark.parametrize("shift", [-0.4, -0.1, 0.05, 0.3])
def test_hue_matches_the_cpu_op_and_a_wrong_direction_does_not(photo, batch, shift) -> None:
    assert within(A.adjust_hue(photo, shift), D.adjust_hue(batch, one(shift))[0], HUE)
    assert not within(A.adjust_hue(photo, -shift), D.adjust_hue(batch, one(shift))[0], HUE)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_blur_is_the_truncated_gaussian(photo, batch, sigma: float) -> None:
    ours = D.gaussian_blur(batch, 5, one(sigma))[0]
    assert within(A.separable_blur(photo, 5, sigma), ours, POINT_OPS)


@pytest.mark.parametrize("recipe", ["moco_v2", "moco_v1"])
def test_batches_match_the_cpu_view_sample_by_sample(photo, recipe: str) -> None:
    """16 crops, each with its own uniforms: the CPU view's colour and blur, and the batched
    ones, within `VIEW` away from the border (PIL's blur repeats the edge)."""
    view = A.ssl_transform(recipe, 64)
    generator = torch.Generator().manual_seed(0)
    pixels = A.to_tensor(photo)
    crops = torch.stack([A.resized_crop(pixels, (int(x), int(y), 48, 48), 64)
                         for x, y in torch.randint(0, 48, (16, 2), generator=generator)])
    u = torch.rand(16, D.COLOUR_DRAWS, dtype=torch.float64, generator=generator)
    u[:4, 10] = 0.0  # some blurred samples in any case (moco_v2)
    device = D.apply_colour(crops, view, u)
    inner = slice(6, -6)
    for i in range(16):
        cpu = A.to_uint8_rgb(view.colour(crops[i], u[i].tolist()))
        assert within(cpu[:, inner, inner], device[i, :, inner, inner], VIEW), i
    params = D.colour_params(view, u)
    assert params.jitter.any() and params.gray.any()
    broken = D.apply_colour(crops, view, torch.cat([u[:, :5], 1 - u[:, 5:6], u[:, 6:]], 1))
    hue_moved = [i for i in range(16) if params.jitter[i] and not params.gray[i]
                 and abs(params.factors[i, 3]) > 0.03]
    assert hue_moved and not all(
        within(A.to_uint8_rgb(view.colour(crops[i], u[i].tolist()))[:, inner, inner],
               broken[i, :, inner, inner], VIEW) for i in hue_moved)


def test_geometry_and_device_colour_are_the_cpu_view(photo: Image.Image) -> None:
    """Under one sample's seed, `View.geometry` + `apply_colour` = the whole CPU view."""
    view = A.ssl_transform("moco_v2", 64)
    cpu, parts, uniforms = [], [], []
    for seed in range(12):
        torch.manual_seed(seed)
        cpu.append(view(photo))
        torch.manual_seed(seed)
        pixels, u = view.geometry(photo)
        parts.append(pixels)
        uniforms.append(u)
    device = D.apply_colour(torch.stack(parts), view, torch.stack(uniforms))
    inner = slice(6, -6)
    assert all(within(cpu[i][:, inner, inner], device[i, :, inner, inner], VIEW)
               for i in range(12))
    assert not within(cpu[0][:, inner, inner], device[1, :, inner, inner], VIEW)
