"""The encoder: a backbone plus an optional projection head, L2-normalised output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seed_core.models.backbones import create_backbone
from seed_core.models.heads import build_head, mlp_layout


class Encoder(nn.Module):
    """Backbone plus optional projection head.

    `forward(x)` gives the L2-normalised embedding `(B, D)` (the head's output, or the backbone
    features when there is no head); `features(x)` gives the backbone features `(B, F)`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.num_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.backbone(x)
        if self.head is not None:
            z = self.head(z)
        # in fp32 even under bf16/fp16 autocast: SEED divides t.t by t_teacher = 1e-4, so a unit
        # norm off by 1e-3 would move the teacher's positive logit by 10
        return F.normalize(z.float(), dim=1)


def build_encoder(arch: str, small_images: bool, embed_dim: int, hidden_dim: int = 0) -> Encoder:
    """Backbone + the MLP head MoCo-v2 and SEED share: `Linear(F, H) - ReLU - Linear(H, D)`.

    Args:
        arch: backbone name (see `create_backbone`).
        small_images: stride-1 stem for 32-pixel data.
        embed_dim: D, the embedding width (the teacher's, for a SEED student).
        hidden_dim: H; 0 = the backbone's feature width F, as MoCo-v2 and SEED do.
    """
    backbone = create_backbone(arch, small_images=small_images)
    width = backbone.num_features
    return Encoder(backbone, build_head(mlp_layout(width, hidden_dim or width, embed_dim)))
