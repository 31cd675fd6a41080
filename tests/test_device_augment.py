"""The batched colour ops and blur (`device_augment`) against the CPU view's ops, on CPU tensors:
op by op at fixed parameters, then whole batches with each sample's own uniforms, within the
tolerances of `test_transforms.py`, which a wrong hue direction crosses."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from seed_core.data import device_augment as D
from seed_core.data import transforms as A
from test_transforms import HUE, POINT_OPS, within

# whole views: up to five ops, each rounded to uint8 on the CPU; the hue of a nearly gray pixel
# moves with one level of rounding upstream, hence the max (measured: up to 7 levels, 0.8 on
# average)
VIEW = (12, 1.0)
# whole batches out of the loader, 32-px patches among them, where a level of rounding is a
# larger share of each op's input (measured: up to 8 levels, 1.4 on average)
VIEW_CHAIN = (12, 2.0)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return Image.open(path).convert("RGB").resize((96, 96), Image.BILINEAR)


@pytest.fixture(scope="module")
def batch(photo: Image.Image) -> torch.Tensor:
    """The photo as a float batch `(1, 3, H, W)` in [0, 1]."""
    return A.to_tensor(photo).float()[None] / 255


@pytest.fixture(scope="module")
def rgb(photo: Image.Image) -> np.ndarray:
    return np.array(photo)


def one(values: float) -> torch.Tensor:
    return torch.tensor([values])


@pytest.mark.parametrize("factor", [0.6, 1.4])
def test_point_ops_match_the_cpu_ops(rgb, batch, factor: float) -> None:
    for cpu, device in [(A.adjust_brightness, D.adjust_brightness),
                        (A.adjust_contrast, D.adjust_contrast),
                        (A.adjust_saturation, D.adjust_saturation)]:
        assert within(cpu(rgb, factor), device(batch, one(factor))[0], POINT_OPS)


@pytest.mark.parametrize("shift", [-0.4, -0.1, 0.05, 0.3])
def test_hue_matches_the_cpu_op_and_a_wrong_direction_does_not(rgb, batch, shift) -> None:
    assert within(A.adjust_hue(rgb, shift), D.adjust_hue(batch, one(shift))[0], HUE)
    assert not within(A.adjust_hue(rgb, -shift), D.adjust_hue(batch, one(shift))[0], HUE)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kernel", [5, 23])
def test_blur_is_the_cpu_views_gaussian(rgb, batch, kernel: int, sigma: float) -> None:
    ours = D.gaussian_blur(batch, kernel, one(sigma))[0]
    assert within(A.gaussian_blur(rgb, kernel, sigma), ours, POINT_OPS)
    assert not within(A.gaussian_blur(rgb, kernel, sigma * 0.8), ours, POINT_OPS)


@pytest.mark.parametrize("recipe", ["moco_v2", "moco_v1"])
def test_batches_match_the_cpu_view_sample_by_sample(photo, recipe: str) -> None:
    """16 crops, each with its own uniforms: the CPU view's colour and blur, and the batched
    ones, within `VIEW`."""
    view = A.ssl_transform(recipe, 64)
    generator = torch.Generator().manual_seed(0)
    pixels = A.to_tensor(photo)
    crops = torch.stack([A.resized_crop(pixels, (int(x), int(y), 48, 48), 64)
                         for x, y in torch.randint(0, 48, (16, 2), generator=generator)])
    u = torch.rand(16, D.COLOUR_DRAWS, dtype=torch.float64, generator=generator)
    u[:4, 10] = 0.0  # some blurred samples in any case (moco_v2)
    device = D.apply_colour(crops, view, u)
    for i in range(16):
        cpu = A.to_uint8_rgb(view.colour(crops[i], u[i].tolist()))
        assert within(cpu, device[i], VIEW), i
    params = D.colour_params(view, u)
    assert params.jitter.any() and params.gray.any()
    broken = D.apply_colour(crops, view, torch.cat([u[:, :5], 1 - u[:, 5:6], u[:, 6:]], 1))
    hue_moved = [i for i in range(16) if params.jitter[i] and not params.gray[i]
                 and abs(params.factors[i, 3]) > 0.03]
    assert hue_moved and not all(
        within(A.to_uint8_rgb(view.colour(crops[i], u[i].tolist())), broken[i], VIEW)
        for i in hue_moved)


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


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory, photo: Image.Image) -> Path:
    """20 colour crops of the photo (80 x 64 PNGs) through the real converter."""
    import io

    from seed_core.data.convert import convert_tsv_to_shards
    from seed_core.data.tsv import write_tsv

    root = tmp_path_factory.mktemp("photo-shards")
    rows = []
    for i in range(20):
        crop = photo.resize((160, 160)).crop((4 * i, 3 * i, 4 * i + 80, 3 * i + 64))
        buffer = io.BytesIO()
        crop.save(buffer, format="PNG")
        rows.append((f"p{i}", i % 2, buffer.getvalue()))
    write_tsv(root / "p.tsv", rows)
    convert_tsv_to_shards(root / "p.tsv", root / "shards", shard_size=8, workers=1)
    return root / "shards"


def first_batch(shards: Path, transform, workers: int) -> dict:
    from seed_core.data import open_shards, train_loader

    loader = train_loader(open_shards(str(shards)), transform, 8, seed=3, epoch=0, rank=0,
                          world_size=1, steps=1, workers=workers)
    return next(iter(loader))


def test_the_loader_leaves_colour_to_the_trainer_and_it_finishes_the_cpu_view(
        photo_shards: Path) -> None:
    """Issue 16, `data.colour_on: device`: with `colour_later`, each collated view is uint8
    pixels `(B, 3, S, S)` beside its uniforms `(B, COLOUR_DRAWS)`, the same for 0 and 2 loader
    workers; `finish_view` on them gives, sample by sample, the CPU view the loader would have
    made under the same seeds (within `VIEW_CHAIN`), normalised as `to_device` normalises."""
    from seed_core.data.deferred import ColourLater
    from seed_core.precision import IMAGENET_MEAN, IMAGENET_STD, to_device

    views = A.MultiView([A.ssl_transform("moco_v2", 64), A.small_patch_transform(32)])
    cpu = first_batch(photo_shards, views, workers=0)
    later = first_batch(photo_shards, A.colour_later(views), workers=0)
    again = first_batch(photo_shards, A.colour_later(views), workers=2)
    assert later["key"] == cpu["key"] == again["key"]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for size, reference, deferred, other in zip((64, 32), cpu["image"], later["image"],
                                                 again["image"]):
        assert isinstance(deferred, ColourLater) and deferred.pixels.dtype == torch.uint8
        assert deferred.pixels.shape == (8, 3, size, size)
        assert deferred.colour.shape == (8, D.COLOUR_DRAWS)
        assert torch.equal(deferred.pixels, other.pixels)
        assert torch.equal(deferred.colour, other.colour)
        finished = D.finish_view(deferred, torch.device("cpu"))
        assert finished.is_contiguous(memory_format=torch.channels_last)
        unit = finished * std + mean  # back to [0, 1]
        inner = slice(size // 8, -(size // 8))
        assert all(within(reference[i][:, inner, inner], unit[i, :, inner, inner], VIEW_CHAIN)
                   for i in range(8))
        # where no colour op ran the two paths give the same normalised floats; a view whose
        # colour was never finished is far from the CPU view
        params = D.colour_params(deferred.view, deferred.colour)
        plain = ~(params.jitter | params.gray | params.blur)
        torch.testing.assert_close(finished[plain], to_device(reference, "cpu")[plain])
        assert not all(within(reference[i][:, inner, inner],
                              deferred.pixels[i, :, inner, inner].float() / 255, VIEW_CHAIN)
                       for i in range(8))


def test_colour_on_follows_the_setting_and_the_device() -> None:
    assert D.colour_on_device("auto", torch.device("cuda")) is True
    assert D.colour_on_device("auto", torch.device("cpu")) is False
    assert D.colour_on_device("device", torch.device("cpu")) is True
    assert D.colour_on_device("cpu", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="data.colour_on must be one of"):
        D.colour_on_device("gpu", torch.device("cpu"))
