"""Backbones by name, with the classifier removed: `(B, 3, H, W)` -> pooled features `(B, F)`.

Every backbone comes from timm by name. The wide ResNet-50s of SWAV / SimCLR / VISSL
(`resnet50w2`, `w4`, `w5`) widen *every* stage including the stem (stem 64w, stage widths
64w..512w, features 2048w) and keep torchvision key names; they are not torchvision's
`wide_resnet50_2`, which widens only the bottleneck's inner convolutions.
"""

from __future__ import annotations

import timm
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

# widening factor of the SWAV / SimCLR / VISSL wide ResNet-50s
WIDE_RESNETS = {"resnet50w2": 2, "resnet50w4": 4, "resnet50w5": 5}

EXAMPLE_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet10t",
                 "resnet50w2", "resnet50w4", "resnet50w5", "efficientnet_b0", "efficientnet_b1",
                 "mobilenetv3_large_100")



def known_arch(arch: str) -> bool:
    return arch in WIDE_RESNETS or timm.is_model(arch)


def create_backbone(arch: str, small_images: bool = False) -> nn.Module:
    """A randomly initialised backbone without classifier.

    Args:
        arch: a timm model name (`resnet18`, `efficientnet_b0`, ...) or `resnet50w2/w4/w5`.
        small_images: for 32-pixel data, a stride-1 stem: ResNets get a 3x3 stride-1 `conv1`
            and no max-pool (a deep 3x3 stem keeps its convs, its first one at stride 1);
            EfficientNet / MobileNet get a stride-1 `conv_stem`, RegNet a stride-1 `stem.conv`.

    Returns:
        a module mapping `(B, 3, H, W)` to `(B, F)` with `F == .num_features`; it also carries
        `.arch_name` and `.small_images` so a twin can be rebuilt.
    """
    if arch in WIDE_RESNETS:
        model = _wide_resnet50(WIDE_RESNETS[arch])
    elif timm.is_model(arch):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    else:
        raise ValueError(f"unknown architecture {arch!r}; use a timm model name or a SWAV wide "
                         f"ResNet, e.g. {', '.join(EXAMPLE_ARCHS)}")
    if small_images:
        _small_image_stem(model, arch)
    # timm's MobileNetV3 reports the last stage's width (960) in num_features although its
    # pooled output passes a head conv (1280); callers size heads and kNN banks from it
    hidden = getattr(model, "head_hidden_size", None)
    if hidden and hidden != model.num_features:
        model.num_features = hidden
    model.arch_name = arch
    model.small_images = bool(small_images)
    return model


def classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the supervised classifier of this backbone's family (`fc.`)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "fc"
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def _wide_resnet50(widen: int) -> nn.Module:
    """ResNet-50 with every width (stem included) multiplied by `widen`, torchvision key names."""
    stem = 64 * widen
    model = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=0,
                   channels=tuple(c * widen for c in (64, 128, 256, 512)))
    # timm's plain 7x7 stem is always 64 wide (its `stem_width` only sizes deep stems), so the
    # stem and the two convolutions that read it are rebuilt at the wide width
    model.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    first = model.layer1[0]
    first.conv1 = nn.Conv2d(stem, first.conv1.out_channels, kernel_size=1, bias=False)
    first.downsample[0] = nn.Conv2d(stem, first.downsample[0].out_channels, kernel_size=1,
                                    bias=False)
    for module in (model.conv1, first.conv1, first.downsample[0]):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    model.feature_info[0]["num_chs"] = stem
    model.pretrained_cfg = {"architecture": f"resnet50w{widen}", "classifier": "fc"}
    return model


def _small_image_stem(model: nn.Module, arch: str) -> None:
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1,
                                padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d):
        conv1[0].stride = (1, 1)  # deep 3x3 stem (resnet10t, -d variants): keep its weights
        model.maxpool = nn.Identity()
    elif isinstance(getattr(model, "conv_stem", None), nn.Conv2d):
        model.conv_stem.stride = (1, 1)
    elif isinstance(getattr(getattr(model, "stem", None), "conv", None), nn.Conv2d):
        model.stem.conv.stride = (1, 1)  # RegNet's ConvNormAct stem: keep its weights
    else:
        raise ValueError(f"small_images: no known stem (conv1 / conv_stem / stem.conv) in "
                         f"{arch!r}")


