"""A view whose colour ops and blur are left to the device (`data.colour_on`), in a module of its
own so that the loader can collate it without importing the transforms (and torchvision)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class ColourLater(NamedTuple):
    """`pixels` uint8 `(3, S, S)` cropped and flipped, `colour` its colour uniforms
    `(COLOUR_DRAWS,)` float64, `view` the recipe (`transforms.View`) that says what to run on
    them. A batch stacks both tensors, `(B, 3, S, S)` and `(B, COLOUR_DRAWS)`, and keeps one view;
    `device_augment.finish_view` runs the rest on the device."""
    pixels: torch.Tensor
    colour: torch.Tensor
    view: Any
