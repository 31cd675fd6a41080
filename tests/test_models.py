"""Backbones (timm and the SWAV wide ResNets), head layouts and the encoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seed_core.models.backbones import create_backbone
from seed_core.models.encoder import Encoder
from seed_core.models.heads import build_head, layout_out_dim, mlp_layout


def _meta_shapes(module_fn) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in module_fn().state_dict().items()}


@pytest.mark.parametrize("arch,width", [("resnet18", 512), ("resnet10t", 512),
                                        ("efficientnet_b0", 1280),
                                        ("mobilenetv3_large_100", 1280)])
def test_backbone_maps_images_to_pooled_features(arch: str, width: int) -> None:
    model = create_backbone(arch).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, width) == (2, model.num_features)
    assert model.arch_name == arch and model.small_images is False


def test_backbone_has_no_classifier_keys() -> None:
    keys = _meta_shapes(lambda: create_backbone("resnet18"))
    assert not [k for k in keys if k.startswith("fc.")]
    assert "conv1.weight" in keys and "layer1.0.conv1.weight" in keys
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.running_var" in keys


def test_small_images_resnet_stem_keeps_resolution() -> None:
    model = create_backbone("resnet18", small_images=True).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    # 32 px in, /8 by the three strided stages: 4x4 before pooling (1x1 with the ImageNet stem)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)
    plain = create_backbone("resnet18").eval()
    assert plain.forward_features(torch.randn(1, 3, 32, 32)).shape[-2:] == (1, 1)


def test_small_images_deep_stem_and_efficientnet() -> None:
    deep = create_backbone("resnet10t", small_images=True)
    assert deep.conv1[0].stride == (1, 1) and isinstance(deep.maxpool, nn.Identity)
    effnet = create_backbone("efficientnet_b0", small_images=True).eval()
    assert effnet.conv_stem.stride == (1, 1)
    assert effnet.forward_features(torch.randn(1, 3, 32, 32)).shape[-2:] == (2, 2)
    # same weights as the ImageNet stem: a checkpoint fits either way
    assert _meta_shapes(lambda: create_backbone("efficientnet_b0", small_images=True)) == \
        _meta_shapes(lambda: create_backbone("efficientnet_b0"))


def test_unknown_arch_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet50x9'.*resnet50w2"):
        create_backbone("resnet50x9")


def swav_wide_resnet50_shapes(widen: int) -> dict[str, tuple[int, ...]]:
    """Naive reference: key -> shape of SWAV's `resnet50w{widen}` (facebookresearch/swav
    src/resnet50.py, ResNet(Bottleneck, [3, 4, 6, 3], widen=w)) without its heads."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,),
                       f"{name}.running_mean": (c,), f"{name}.running_var": (c,),
                       f"{name}.num_batches_tracked": ()})

    stem = 64 * widen
    shapes["conv1.weight"] = (stem, 3, 7, 7)
    bn("bn1", stem)
    inplanes = stem
    for layer, (planes, blocks) in enumerate(zip([64 * widen * 2 ** i for i in range(4)],
                                                 [3, 4, 6, 3]), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return shapes


@pytest.mark.parametrize("widen", [1, 2, 4, 5])
def test_wide_resnet50_matches_swav_layout(widen: int) -> None:
    arch = "resnet50" if widen == 1 else f"resnet50w{widen}"
    with torch.device("meta"):
        model = create_backbone(arch)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == swav_wide_resnet50_shapes(widen)
    assert model.num_features == 2048 * widen


def test_resnet50w2_is_not_torchvision_wide_resnet50_2() -> None:
    import torchvision

    ours = _meta_shapes(lambda: create_backbone("resnet50w2"))
    tv = _meta_shapes(lambda: torchvision.models.wide_resnet50_2())
    assert ours["conv1.weight"] == (128, 3, 7, 7) and tv["conv1.weight"] == (64, 3, 7, 7)
    with torch.device("meta"):
        params = sum(p.numel() for p in create_backbone("resnet50w2").parameters())
    assert abs(params / 1e6 - 93.9) < 0.1  # SWAV / SimCLR report 94M for R50-w2


def test_wide_resnet_runs() -> None:
    model = create_backbone("resnet50w2", small_images=True).eval()
    assert model.conv1.weight.shape == (128, 3, 3, 3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4096)


def test_build_head_keys_and_layout() -> None:
    layout = [["linear", 8, 6, False], ["bn", 6, True], ["relu"], ["linear", 6, 4, True],
              ["gelu"], ["bn", 4, False]]
    head = build_head(layout)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.GELU,
                                       nn.BatchNorm1d]
    assert set(head.state_dict()) == {
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "3.weight", "3.bias", "5.running_mean", "5.running_var",
        "5.num_batches_tracked"}
    assert head.layout == layout
    assert head.eval()(torch.randn(3, 8)).shape == (3, 4)
    assert layout_out_dim(layout, 8) == 4


def test_mlp_layout_is_linear_relu_linear() -> None:
    assert mlp_layout(512, 256, 128) == [["linear", 512, 256, True], ["relu"],
                                         ["linear", 256, 128, True]]


def test_bad_layouts_error() -> None:
    with pytest.raises(ValueError, match="entry 1"):
        build_head([["linear", 4, 4, True], ["tanh"]])
    with pytest.raises(ValueError, match="expects 512 inputs, gets 2048"):
        layout_out_dim(mlp_layout(512, 512, 128), 2048)


def test_encoder_normalises_the_head_output() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("resnet18").eval()
    head = build_head(mlp_layout(512, 64, 16))
    encoder = Encoder(backbone, head).eval()
    x = torch.randn(3, 3, 32, 32)
    z = encoder(x)
    assert z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(z, F.normalize(head(backbone(x)), dim=1))
    torch.testing.assert_close(encoder.features(x), backbone(x))
    assert encoder.feature_dim == 512
    no_head = Encoder(backbone).eval()
    torch.testing.assert_close(no_head(x), F.normalize(backbone(x), dim=1))
