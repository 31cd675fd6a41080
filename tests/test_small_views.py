"""The small-views analysis: BatchNorm statistics recomputed against a naive reference, the
README section rendered from the committed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from seed_core.report.small_views import (BEGIN, END, main, recompute_bn_statistics, resized,
                                          section)

ROOT = Path(__file__).resolve().parent.parent


def test_recomputed_statistics_are_the_average_over_the_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                          nn.BatchNorm2d(2))
    model.train()
    for _ in range(3):  # statistics of other data, as a student's patches would leave
        model(torch.randn(8, 3, 6, 6) * 5 + 3)
    batches = [torch.randn(5, 3, 6, 6) for _ in range(4)]
    assert recompute_bn_statistics(model, model, batches) == 20
    assert not model.training and all(m.momentum == 0.1 for m in model if
                                       isinstance(m, nn.BatchNorm2d))
    # the naive reference: each BatchNorm's input per batch, with the first BatchNorm in eval
    # mode on the recomputed statistics (what the second one saw during the recomputation is
    # the first one normalising with that batch's own statistics)
    first, second = model[1], model[4]
    inputs = [model[0](x) for x in batches]
    mean = torch.stack([i.mean((0, 2, 3)) for i in inputs]).mean(0)
    var = torch.stack([i.var((0, 2, 3), unbiased=True) for i in inputs]).mean(0)
    assert torch.allclose(first.running_mean, mean, atol=1e-5)
    assert torch.allclose(first.running_var, var, atol=1e-5)
    seconds = []
    for i in inputs:
        normed = (i - i.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            i.var((0, 2, 3), unbiased=False, keepdim=True) + first.eps)
        normed = normed * first.weight[None, :, None, None] + first.bias[None, :, None, None]
        seconds.append(model[3](torch.relu(normed)))
    want = torch.stack([s.mean((0, 2, 3)) for s in seconds]).mean(0)
    assert torch.allclose(second.running_mean, want, atol=1e-5)
    assert first.num_batches_tracked.item() == 4


def test_no_image_is_an_error_and_a_model_without_batchnorm_is_left_alone() -> None:
    with pytest.raises(ValueError, match="no image to recompute"):
        recompute_bn_statistics(nn.BatchNorm2d(3), lambda x: x, [])
    assert recompute_bn_statistics(nn.Linear(2, 2), lambda x: x, []) == 0


def test_16_px_upsampled_keeps_the_size_and_loses_the_detail() -> None:
    x = torch.randn(2, 3, 32, 32)
    small = resized(x, 16)
    back = resized(small, 32)
    assert small.shape[-1] == 16 and back.shape == x.shape
    # the 16-px detour averages neighbouring pixels: noise loses most of its variance, a
    # constant image none of its value
    assert back.var() < 0.5 * x.var()
    assert torch.allclose(resized(resized(torch.full((1, 3, 32, 32), 0.7), 16), 32),
                          torch.full((1, 3, 32, 32), 0.7), atol=1e-5)


RESULTS = {"default": {"arch": "mobilenetv3_small_050", "as_trained": 75.0,
                       "bn_recomputed": 74.5, "at_16px": 40.0, "at_16px_upsampled": 60.25,
                       "k": 20, "temperature": 0.07, "holdout_samples": 1000},
           "teacher": {"arch": "resnet18d", "as_trained": 80.0, "bn_recomputed": 79.9,
                       "at_16px": 50.0, "at_16px_upsampled": 70.0, "k": 20,
                       "temperature": 0.07, "holdout_samples": 1000}}


def test_the_section_shows_each_change_from_as_trained(tmp_path) -> None:
    text = section(RESULTS)
    assert ("| default | mobilenetv3_small_050 | 75.00 | 74.50 (-0.50) | 40.00 (-35.00) | "
            "60.25 (-14.75) |") in text
    assert "k = 20, T = 0.07" in text and "(1000 training images)" in text
    out = tmp_path / "small_views.json"
    out.write_text(json.dumps(RESULTS))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{BEGIN}\nold\n{END}\n")
    assert main(["--out", str(out), "--readme", str(readme), "--check"]) == 1
    assert main(["--out", str(out), "--readme", str(readme)]) == 0
    assert main(["--out", str(out), "--readme", str(readme), "--check"]) == 0
    assert "| teacher | resnet18d | 80.00 |" in readme.read_text()


def test_the_readme_section_is_the_committed_measurement() -> None:
    """README.md's small-views table is rendered from metrics/small_views.json (its prose cites
    those numbers: re-render and re-read it after a re-measurement)."""
    assert main(["--out", str(ROOT / "metrics" / "small_views.json"), "--readme",
                 str(ROOT / "README.md"), "--check"]) == 0
    results = json.loads((ROOT / "metrics" / "small_views.json").read_text())
    assert set(results) == {"default", "small-views-2", "teacher"}
    assert all(r["holdout_samples"] == 1000 and r["bn_images"] == 9000 for r in results.values())
