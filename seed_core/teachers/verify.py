"""The teacher's check: weighted kNN top-1 of its backbone features on held-out training samples
against the same architecture randomly initialised, on the same images, with a verdict that can
fail. A randomly initialised network already separates easy datasets well (65.5% kNN top-1 on
Fashion-MNIST for a ResNet-18-D), so "above chance" proves nothing: a broken conversion, a
checkpoint of another architecture or scrambled weights must not pass as a teacher.

The verdict (`judge_teacher`) asks for both:
- significance: a one-sided paired McNemar test (teacher better than random init on the same
  held-out images) at p < `GATE_P` = 0.01, so a teacher no better than an untrained network
  passes at most 1% of the time;
- a practical margin of `MIN_GAP_POINTS` = 2 points: on a large check set a gap of a fraction of
  a point becomes significant, yet a teacher that close to an untrained network of its own
  architecture has learnt next to nothing worth distilling. Real SSL teachers clear it widely
  (the pipeline's 12-epoch MoCo-v2 ResNet-18-D: 75.25% against 65.5% on 400 held-out images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from seed_core.data.loader import eval_loader
from seed_core.data.shardset import open_shards
from seed_core.data.transforms import eval_transform
from seed_core.evaluation.features import extract_features
from seed_core.evaluation.knn import knn_neighbors, knn_vote
from seed_core.evaluation.splits import holdout_split
from seed_core.evaluation.stats import mcnemar
from seed_core.models.backbones import create_backbone
from seed_core.models.encoder import Encoder

KNN_K, KNN_T = 20, 0.07  # the usual weighted-kNN headline (InstDisc / DINO)
HOLDOUT_FRACTION = 0.2
GATE_P = 0.01
MIN_GAP_POINTS = 2.0


@dataclass(frozen=True)
class TeacherVerdict:
    passed: bool
    gap: float  # teacher - random init, points
    p_value: float  # one-sided McNemar, teacher better
    teacher_only: int  # held-out images only the teacher classifies right
    random_only: int
    reasons: tuple[str, ...]  # why it failed; empty when passed


def judge_teacher(teacher_correct: Any, random_correct: Any, gate_p: float = GATE_P,
                  min_gap: float = MIN_GAP_POINTS) -> TeacherVerdict:
    """Is the teacher clearly better than random init? Per-sample correctness `(N,)` of both on
    the same held-out images; see the module doc for the two conditions."""
    teacher_correct = np.asarray(teacher_correct, dtype=bool)
    random_correct = np.asarray(random_correct, dtype=bool)
    test = mcnemar(teacher_correct, random_correct, alternative="greater")
    gap = 100.0 * (float(teacher_correct.mean()) - float(random_correct.mean()))
    reasons = []
    if not test.p_value < gate_p:
        reasons.append(f"one-sided paired McNemar p = {test.p_value:.3g} (needs < {gate_p:g}; "
                       f"{test.a_only} images only the teacher got right, {test.b_only} only "
                       f"the random network)")
    if not gap >= min_gap:
        reasons.append(f"gap {gap:+.2f} points (needs >= {min_gap:g})")
    return TeacherVerdict(passed=not reasons, gap=gap, p_value=test.p_value,
                          teacher_only=test.a_only, random_only=test.b_only,
                          reasons=tuple(reasons))


def knn_correct(features: torch.Tensor, labels: torch.Tensor, fit: torch.Tensor,
                held: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per held-out sample: does the weighted kNN (k = 20, T = 0.07; bank = the fit samples)
    classify it right? `(len(held),)` bool."""
    sims, idx = knn_neighbors(features[fit], features[held], KNN_K)
    scores = knn_vote(sims, labels[fit].to(idx.device)[idx], KNN_T, num_classes)
    return scores.argmax(dim=1).cpu() == labels[held]


@torch.no_grad()
def verify_knn(encoder: Encoder, shards_dir: str | Path, samples: int, image_size: int,
               device: torch.device | str) -> dict[str, Any]:
    """kNN top-1 (%) of the teacher's backbone features and of the same arch randomly
    initialised (seed 0) on the same held-out part of the first `samples` training samples,
    with the verdict of `judge_teacher` (`knn_verified`) and chance beside them."""
    device = torch.device(device)
    shards = open_shards(shards_dir)
    num_classes = shards.num_classes

    def correct(features_fn: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple[torch.Tensor, int, int]:
        loader = eval_loader(shards, eval_transform(image_size), 256, workers=0, limit=samples)
        feats, labels, _ = extract_features(features_fn, loader, device)
        fit, held = holdout_split(labels, HOLDOUT_FRACTION, seed=0)
        return knn_correct(feats, labels, fit, held, num_classes), fit.numel(), held.numel()

    encoder = encoder.to(device).eval()
    teacher, n_fit, n_held = correct(encoder.features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_init = create_backbone(encoder.backbone.arch_name, encoder.backbone.small_images)
    random, _, _ = correct(random_init.to(device).eval())
    verdict = judge_teacher(teacher.numpy(), random.numpy())
    return {"knn_top1": round(100.0 * teacher.float().mean().item(), 3),
            "knn_top1_random_init": round(100.0 * random.float().mean().item(), 3),
            "knn_chance": round(100.0 / num_classes, 3), "knn_gap": round(verdict.gap, 3),
            "knn_p_value": verdict.p_value, "knn_teacher_only": verdict.teacher_only,
            "knn_random_only": verdict.random_only, "knn_verified": verdict.passed,
            "knn_gate_p": GATE_P, "knn_min_gap": MIN_GAP_POINTS,
            "knn_failures": list(verdict.reasons), "knn_k": KNN_K,
            "knn_temperature": KNN_T, "knn_fit_samples": n_fit, "knn_heldout_samples": n_held,
            "knn_image_size": image_size}
