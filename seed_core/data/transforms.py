"""Augmentation recipes (torchvision transforms v2), sized by `data.image_size`.

Every transform takes a decoded `uint8` image tensor `(C, H, W)` with C = 1 (grayscale) or 3 and
returns normalised float `(3, S, S)`. Two choices keep the per-sample cost low (a loader worker
shares the cores with training):
- the crop (or resize) runs on uint8, then the image becomes float in [0, 1] (`ToUnitFloat`):
  the colour and blur ops on a small float image cost half what they cost on uint8, where
  torchvision converts and rounds around every op;
- grayscale sources are augmented on their single channel and expanded to RGB at the end:
  saturation, hue and grayscale conversion are exact identities on a gray image, so this is the
  same distribution as augmenting the replicated RGB image, at a third of the cost.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torchvision.transforms.v2 as T

# Teacher checkpoints (MoCo, SWAV, DINO...) were trained on ImageNet-normalised inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[torch.Tensor], torch.Tensor]


class ToUnitFloat(torch.nn.Module):
    """uint8 `(C, H, W)` -> float in [0, 1]: what torchvision's colour ops expect of floats."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.as_subclass(torch.Tensor).float().div_(255.0)


class ToNormalizedRGB(torch.nn.Module):
    """Float `(1|3, H, W)` in [0, 1] -> `(3, H, W)`, ImageNet-normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.as_subclass(torch.Tensor)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return (x - self.mean) / self.std


def _blur_kernel(size: int) -> int:
    """MoCo/SimCLR blur about 10% of the image side; odd, at least 3."""
    k = max(3, int(round(size * 0.1)))
    return k if k % 2 == 1 else k + 1


# SEED's released code (`tools/utils.py`) picks the distillation augmentation by the teacher's
# SSL method; the recipes below follow it op for op, sized by `image_size` instead of 224 px.
MOCO_SCALE = (0.2, 1.0)
SWAV_SCALE = (0.14, 1.0)
SMALL_PATCH_SCALE = (0.05, 0.14)
BLUR_SIGMA = (0.1, 2.0)


def _mocov2_colour(size: int) -> list:
    """MoCo-v2's colour ops, which SEED also keeps for SwAV teachers ("not strengthened"):
    jitter 0.4/0.4/0.4/0.1 with p = 0.8, grayscale p = 0.2, Gaussian blur p = 0.5."""
    return [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(_blur_kernel(size), sigma=BLUR_SIGMA)], p=0.5)]


def _mocov1_colour() -> list:
    """MoCo-v1's (InstDisc's) colour ops: grayscale p = 0.2 first, then jitter 0.4/0.4/0.4/0.4
    every time, no blur."""
    return [T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4)]


def _view(size: int, scale: tuple[float, float], colour: list) -> Transform:
    return T.Compose([T.RandomResizedCrop(size, scale=scale, antialias=True), ToUnitFloat(),
                      *colour, T.RandomHorizontalFlip(), ToNormalizedRGB()])


def moco_v2_transform(image_size: int) -> Transform:
    """MoCo-v2 teachers (and MLP-head MoCo): crop 0.2-1, MoCo-v2 colour ops, flip."""
    return _view(image_size, MOCO_SCALE, _mocov2_colour(image_size))


def moco_v1_transform(image_size: int) -> Transform:
    """MoCo-v1 teachers: crop 0.2-1, grayscale p = 0.2, jitter 0.4/0.4/0.4/0.4 always, flip."""
    return _view(image_size, MOCO_SCALE, _mocov1_colour())


def simclr_transform(image_size: int) -> Transform:
    """SimCLR teachers, as SEED's code does it: the MoCo-v1 recipe (no blur, jitter always)."""
    return moco_v1_transform(image_size)


def swav_transform(image_size: int) -> Transform:
    """SwAV teachers: crop 0.14-1, then MoCo-v2's colour ops (SEED does not use SwAV's
    strengthened 0.8/0.8/0.8/0.2 jitter), flip."""
    return _view(image_size, SWAV_SCALE, _mocov2_colour(image_size))


def small_patch_transform(patch_size: int) -> Transform:
    """SEED's small patches (SwAV teachers' multi-crop): crop 0.05-0.14 to `patch_size` (96 px
    at 224), then the SwAV recipe's colour ops, flip."""
    return _view(patch_size, SMALL_PATCH_SCALE, _mocov2_colour(patch_size))


# recipe name -> builder; the teacher format decides which one distillation uses
RECIPES: dict[str, Callable[[int], Transform]] = {
    "moco_v2": moco_v2_transform,
    "moco_v1": moco_v1_transform,
    "simclr": simclr_transform,
    "swav": swav_transform,
}


def ssl_transform(recipe: str, image_size: int) -> Transform:
    """The distillation view of recipe `recipe` (a key of `RECIPES`) at `image_size`."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; known: {sorted(RECIPES)}")
    return RECIPES[recipe](image_size)


def eval_transform(image_size: int) -> Transform:
    """Resize + centre crop (ratio 0.875, as MoCo's val) from 96 px up; plain resize below,
    where a centre crop would cut most of a 28-32 px object."""
    if image_size >= 96:
        resize = [T.Resize(int(round(image_size / 0.875)), antialias=True),
                  T.CenterCrop(image_size)]
    else:
        resize = [T.Resize((image_size, image_size), antialias=True)]
    return T.Compose([*resize, ToUnitFloat(), ToNormalizedRGB()])


def linear_train_transform(image_size: int) -> Transform:
    """MoCo linear-evaluation training view: RandomResizedCrop (0.08-1) + flip."""
    return T.Compose([T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip(),
                      ToUnitFloat(), ToNormalizedRGB()])


class MultiView:
    """Apply several transforms to one image: `[view_0, view_1, ...]`."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]
