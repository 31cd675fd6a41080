"""The teacher's sanity check: weighted kNN top-1 of its backbone features on held-out training
samples, beside the same architecture randomly initialised and chance, so an easy dataset
cannot pass off a broken conversion as a good teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from seed_core.data.loader import eval_loader, open_shards
from seed_core.data.transforms import eval_transform
from seed_core.evaluation.features import extract_features
from seed_core.evaluation.knn import knn_classify
from seed_core.evaluation.splits import holdout_split
from seed_core.models.backbones import create_backbone
from seed_core.models.encoder import Encoder

KNN_K, KNN_T = 20, 0.07  # the usual weighted-kNN headline (InstDisc / DINO)
HOLDOUT_FRACTION = 0.2


@torch.no_grad()
def verify_knn(encoder: Encoder, shards_dir: str | Path, samples: int, image_size: int,
               device: torch.device | str) -> dict[str, Any]:
    """Weighted kNN top-1 (%) of the backbone features on a held-out part of the first
    `samples` training samples, with the same arch randomly initialised and chance beside it.
    """
    device = torch.device(device)
    num_classes = open_shards(shards_dir).num_classes
    loader = eval_loader(shards_dir, eval_transform(image_size), 256, workers=0, limit=samples)

    def top1(features_fn) -> tuple[float, int, int]:
        feats, labels, _ = extract_features(features_fn, loader, device)
        fit, held = holdout_split(labels, HOLDOUT_FRACTION, seed=0)
        scores = knn_classify(feats[fit], labels[fit], feats[held], KNN_K, KNN_T, num_classes)
        correct = (scores.argmax(dim=1).cpu() == labels[held]).float().mean().item()
        return 100.0 * correct, int(fit.numel()), int(held.numel())

    encoder = encoder.to(device).eval()
    teacher_top1, n_fit, n_held = top1(encoder.features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_init = create_backbone(encoder.backbone.arch_name, encoder.backbone.small_images)
    random_top1, _, _ = top1(random_init.to(device).eval())
    return {"knn_top1": round(teacher_top1, 3), "knn_top1_random_init": round(random_top1, 3),
            "knn_chance": round(100.0 / num_classes, 3), "knn_k": KNN_K,
            "knn_temperature": KNN_T, "knn_fit_samples": n_fit, "knn_heldout_samples": n_held,
            "knn_image_size": image_size}
