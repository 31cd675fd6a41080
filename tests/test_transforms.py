"""The distillation augmentations are SEED's released recipes (`tools/utils.py`), chosen by the
teacher's SSL method: each recipe's ops, order and parameters are read off the built transform,
then the transform is run on RGB and grayscale images."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2 as T

from seed_core.data.transforms import (RECIPES, MultiView, ToNormalizedRGB, ToUnitFloat,
                                       eval_transform, linear_train_transform,
                                       small_patch_transform, ssl_transform)


def describe(transform) -> list[tuple]:
    """The transform's ops in order, as (name, parameters...) tuples a test can compare."""
    out = []
    for op in transform.transforms:
        if isinstance(op, T.RandomApply):
            (inner,) = op.transforms
            out.append(("p", op.p, *describe(T.Compose([inner]))))
        elif isinstance(op, T.RandomResizedCrop):
            out.append(("crop", tuple(op.size), tuple(op.scale)))
        elif isinstance(op, T.ColorJitter):
            out.append(("jitter", op.brightness, op.contrast, op.saturation, op.hue))
        elif isinstance(op, T.RandomGrayscale):
            out.append(("gray", op.p))
        elif isinstance(op, T.GaussianBlur):
            out.append(("blur", tuple(op.sigma)))
        elif isinstance(op, T.RandomHorizontalFlip):
            out.append(("flip", op.p))
        elif isinstance(op, ToUnitFloat):
            out.append(("float",))
        elif isinstance(op, ToNormalizedRGB):
            out.append(("normalize",))
        else:
            raise AssertionError(f"unexpected op {op!r}")
    return out


def jitter(b, c, s, h):
    """ColorJitter(b, c, s, h) as torchvision stores it: factor ranges, hue symmetric."""
    return ("jitter", (1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h))


MOCO_V2_COLOUR = [("p", 0.8, jitter(0.4, 0.4, 0.4, 0.1)), ("gray", 0.2),
                  ("p", 0.5, ("blur", (0.1, 2.0)))]
MOCO_V1_COLOUR = [("gray", 0.2), jitter(0.4, 0.4, 0.4, 0.4)]
END = [("flip", 0.5), ("normalize",)]
EXPECTED = {
    "moco_v2": [("crop", (32, 32), (0.2, 1.0)), ("float",), *MOCO_V2_COLOUR, *END],
    "moco_v1": [("crop", (32, 32), (0.2, 1.0)), ("float",), *MOCO_V1_COLOUR, *END],
    "simclr": [("crop", (32, 32), (0.2, 1.0)), ("float",), *MOCO_V1_COLOUR, *END],
    # SEED keeps MoCo-v2's jitter for SwAV teachers, not SwAV's strengthened 0.8/0.8/0.8/0.2
    "swav": [("crop", (32, 32), (0.14, 1.0)), ("float",), *MOCO_V2_COLOUR, *END],
}


def approx(described):
    """Floats compared with a tolerance (torchvision stores 1 - 0.4 as 0.6000000000000001)."""
    if isinstance(described, (list, tuple)):
        return type(described)(approx(d) for d in described)
    return pytest.approx(described) if isinstance(described, float) else described


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_ops_order_and_parameters(recipe: str) -> None:
    assert describe(ssl_transform(recipe, 32)) == approx(EXPECTED[recipe])


def test_every_recipe_is_tested_and_unknown_names_fail() -> None:
    assert set(RECIPES) == set(EXPECTED)
    with pytest.raises(ValueError, match=r"unknown augmentation recipe 'byol'; known: \["):
        ssl_transform("byol", 32)


def test_small_patch_recipe_is_swavs_colour_at_small_scale() -> None:
    assert describe(small_patch_transform(14)) == approx(
        [("crop", (14, 14), (0.05, 0.14)), ("float",), *MOCO_V2_COLOUR, *END])


def test_blur_kernel_follows_the_image_size() -> None:
    def kernel(t):
        return next(op.transforms[0].kernel_size for op in t.transforms
                    if isinstance(op, T.RandomApply)
                    and isinstance(op.transforms[0], T.GaussianBlur))

    assert kernel(ssl_transform("moco_v2", 224)) == (23, 23)  # SimCLR: 10% of the side, odd
    assert kernel(ssl_transform("swav", 32)) == (3, 3)


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
@pytest.mark.parametrize("channels", [1, 3])
def test_recipes_run_on_gray_and_rgb(recipe: str, channels: int) -> None:
    image = torch.randint(0, 256, (channels, 40, 36), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    views = MultiView([ssl_transform(recipe, 32), small_patch_transform(12)])(image)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32), (3, 12, 12)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    torch.manual_seed(1)
    again = ssl_transform(recipe, 32)(image)
    assert not torch.equal(again, views[0])  # random crops differ between draws


def test_eval_and_linear_transforms_keep_their_shape() -> None:
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    assert eval_transform(32)(image).shape == (3, 32, 32)
    assert linear_train_transform(32)(image).shape == (3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    white = torch.full((1, 4, 4), 255, dtype=torch.uint8)
    torch.testing.assert_close(ToNormalizedRGB()(ToUnitFloat()(white)),
                               ((1 - mean) / std).expand(3, 4, 4))
    # an eval view of a white image is exactly that (resize keeps a constant image constant)
    torch.testing.assert_close(eval_transform(4)(white), ((1 - mean) / std).expand(3, 4, 4))
