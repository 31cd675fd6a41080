"""The precision a model trains in: bf16 on CPU only where torch computes its gradients right."""

from __future__ import annotations

import pytest
import torch

import seed_core.precision as precision
from seed_core.config import ConfigError
from seed_core.models.encoder import build_encoder

CPU = torch.device("cpu")


def resnet(small_images: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder("resnet18d", small_images, 16, hidden_dim=32)


def test_one_pixel_strided_convs_follow_the_feature_map_size() -> None:
    model = resnet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 16 px: stem /4, layer2 /2, layer3 /2 -> layer4's strided 3x3 reads a 1x1 map
    assert precision.one_pixel_strided_convs(model, 16) == ["backbone.layer4.0.conv1"]
    assert precision.one_pixel_strided_convs(model, 32) == []
    assert precision.one_pixel_strided_convs(resnet(small_images=True), 16) == []
    # the probe changed neither a module's mode nor a running statistic
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_precision_avoids_bf16_where_its_weight_gradient_is_garbage(monkeypatch) -> None:
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    model = resnet()
    assert precision.training_precision("auto", CPU, model, [32], "pretrain.precision") == "bf16"
    assert precision.training_precision("auto", CPU, model, [16], "pretrain.precision") == "fp32"
    # a small view counts as much as the main one
    assert precision.training_precision("auto", CPU, model, [32, 16], "distill.precision") == \
        "fp32"
    assert precision.training_precision("fp32", CPU, model, [16], "pretrain.precision") == "fp32"
    with pytest.raises(ConfigError, match=r"'distill.precision' = 'bf16'.*backbone\.layer4\.0\."
                                          r"conv1 see a 1x1 input at 16 px") as raised:
        precision.training_precision("bf16", CPU, model, [32, 16], "distill.precision")
    assert raised.value.key == "distill.precision"
    # CUDA's fp16 is not concerned (the device type alone decides; no CUDA needed)
    assert precision.training_precision("auto", torch.device("cuda"), model, [16], "k") == "fp16"


def train_twice(image_size: int, concrete: str) -> list[torch.Tensor]:
    """Three SGD steps of resnet18d on fixed random images, from the same start, twice."""
    results = []
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 3, image_size, image_size, generator=generator)
    target = torch.randn(16, 16, generator=generator)
    for _ in range(2):
        model = precision.channels_last(resnet().train())
        # timm zero-initialises each block's last BN scale, which would leave layer4's first
        # convolution without a gradient on the first step
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            with precision.autocast(CPU, concrete):
                embeddings = model(images.contiguous(memory_format=torch.channels_last))
            loss = (embeddings.float() * target).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results.append(model.backbone.layer4[0].conv1.weight.detach().clone())
    return results


def test_training_in_the_chosen_precision_is_bounded_and_repeatable() -> None:
    """In bf16 on this project's CPU, the off-centre taps of layer4.0.conv1's weight gradient
    (exactly 0 in fp32: they only see padding) came out as garbage up to 1e34 or nan, different
    in every run, and the pipeline's teacher grew a weight of 7e8 (torch 2.14.1). In the precision
    `training_precision` picks, two runs are equal and the weights stay bounded."""
    concrete = precision.training_precision("auto", CPU, resnet(), [16], "pretrain.precision")
    assert concrete == "fp32"
    first, second = train_twice(16, concrete)
    assert torch.equal(first, second)
    assert torch.isfinite(first).all() and first.abs().max() < 1.0
    # the taps that only see padding have no gradient: without weight decay they stay put
    initial = resnet().backbone.layer4[0].conv1.weight.detach()
    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    assert torch.equal(first[:, :, off_centre], initial[:, :, off_centre])
    assert not torch.equal(first[:, :, 1, 1], initial[:, :, 1, 1])
