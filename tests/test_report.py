import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import write_tiny_shards
from seed_core.config import load_params
from seed_core.evaluation.knn import knn_classify
from seed_core.evaluation.metrics import topk_accuracy
from seed_core.evaluation.predictions import load_predictions
from seed_core.evaluation.stats import mcnemar
from seed_core.evaluation.splits import holdout_split
from seed_core.report.plots import (pca_2d, plot_embeddings, plot_per_class, plot_training_curves,
                                    subsample)
from seed_core.report.comparisons import paired_metrics
from seed_core.report.prose import ReadingContext, reading_paragraph, render_summary_md
from seed_core.report.readers import (check_reproduce, read_metrics, read_model_meta,
                                      read_training_log, stage_seconds)
from seed_core.report.tables import (MODELS, SUMMARY_KEYS, build_summary, method_label, p_label,
                                     results_table, seeds_table, summary_metrics)
from seed_core.teachers.canonical import save_encoder
from seed_core.tracking import flatten_metrics

ROOT = Path(__file__).resolve().parents[1]


def metrics(top1, top5, **extra):
    return {"test": {"top1": top1, "top5": top5}, **extra}


def context(**overrides):
    values = dict(n_test=10000, image_size=32, teacher_arch="resnet18", student_arch="resnet10t",
                  teacher_small_images=False, student_small_images=False, teacher_epochs=8,
                  baseline_epochs=8, distill_epochs=8)
    values.update(overrides)
    return ReadingContext(**values)


def summary_of(teacher, baseline, student):
    """Linear top-1 per model; kNN a little lower, top-5 higher."""
    return {m: {"knn_top1": v - 2, "knn_top5": v + 10, "linear_top1": v, "linear_top5": v + 12}
            for m, v in (("teacher", teacher), ("baseline", baseline), ("student", student))}


# ----------------------------------------------------------------------------- summary


def test_build_summary_has_exact_shape():
    knn = {m: metrics(50.0 + i, 80.0, k=20) for i, m in enumerate(MODELS)}
    linear = {m: metrics(60.0 + i, 90.0, lr=30.0) for i, m in enumerate(MODELS)}
    summary = build_summary(knn, linear)
    assert list(summary) == ["teacher", "baseline", "student"]
    assert summary["student"] == {"knn_top1": 52.0, "knn_top5": 80.0, "linear_top1": 62.0,
                                  "linear_top5": 90.0}
    assert summary_metrics(summary)["student.knn_top1"] == 52.0
    del linear["baseline"]["test"]["top5"]
    with pytest.raises(ValueError, match="linear metrics of 'baseline' lack test 'top5'"):
        build_summary(knn, linear)


def test_flatten_metrics_keeps_numbers_only():
    flat = flatten_metrics({"name": "x", "k": 20, "holdout": {"top1": 1.5,
                                   "sweep_top1": {"10": 2.0}}, "per_class_top1": [1, 2],
                                   "ok": True})
    assert flat == {"k": 20.0, "holdout.top1": 1.5, "holdout.sweep_top1.10": 2.0}


def test_results_table_rows_and_labels():
    metas = {"teacher": {"arch": "resnet50", "format": "moco_v2"},
             "baseline": {"arch": "resnet18", "method": "moco_v2", "epochs": 200},
             "student": {"arch": "resnet18", "method": "seed", "epochs": 200,
                         "teacher_arch": "resnet50"}}
    table = results_table(summary_of(67.4, 52.5, 57.6), metas).splitlines()
    assert table[2].startswith("| Teacher | resnet50 | MoCo-v2 (external checkpoint) | – | "
                               "external | 65.40 |")
    assert "| Baseline (no distillation) | resnet18 | MoCo-v2 | ✗ | 200 |" in table[3]
    assert table[4].startswith("| SEED | resnet18 | SEED | ✓ from resnet50 | 200 | 55.60 |")


def comparison(difference, p_value, samples=10000):
    """A paired comparison as `PairedComparison.to_dict()` writes it."""
    return {"a_top1": 80.0 + difference, "b_top1": 80.0, "difference": difference,
            "ci_low": difference - 0.5, "ci_high": difference + 0.5, "confidence": 0.95,
            "resamples": 10000, "a_only": 120, "b_only": 100, "p_value": p_value,
            "test": "chi2", "samples": samples, "significant": p_value < 0.05}


def paired_of(teacher_vs_student, student_vs_baseline, teacher_vs_baseline, knn=None):
    """The same (difference, p) per pair for both protocols, unless `knn` overrides kNN's."""
    linear = {"teacher_vs_student": comparison(*teacher_vs_student),
              "student_vs_baseline": comparison(*student_vs_baseline),
              "teacher_vs_baseline": comparison(*teacher_vs_baseline)}
    knn_pairs = dict(linear)
    for pair, values in (knn or {}).items():
        knn_pairs[pair] = comparison(*values)
    return {"knn": knn_pairs, "linear": linear}


SIG, NOT = 1e-6, 0.4  # p-values: clearly significant, clearly not


def test_reading_paragraph_expected_order():
    paired = paired_of((9.8, SIG), (5.1, SIG), (14.9, SIG))
    text = reading_paragraph(summary_of(67.4, 52.5, 57.6), paired, context())
    assert "teacher (67.40) > SEED student (57.60) > baseline (52.50)" in text
    assert "Distillation helped" in text and "+5.10 points linear" in text
    assert "significantly on both kNN and linear top-1" in text
    assert "Teacher > SEED > baseline holds on both kNN and linear top-1" in text
    assert "SEED − baseline +5.10 kNN [+4.60, +5.60], p = 1.0e-06" in text
    assert "Settings most likely" not in text


def test_reading_paragraph_weak_teacher_points_at_teacher_settings():
    paired = paired_of((-1.0, NOT), (-1.0, NOT), (-2.0, NOT))
    text = reading_paragraph(summary_of(50.0, 52.0, 51.0), paired, context())
    assert "teacher is not clearly better" in text and "little to distil" in text
    assert "holds on neither kNN nor linear top-1" in text
    assert "a longer teacher pre-training (it had 8 epochs, no more than the baseline)" in text
    assert "wider or deeper teacher than resnet18" in text
    assert "small-image 3x3 stem for 32-px data" in text
    # with the small stem already on and an external teacher, neither is suggested
    text = reading_paragraph(summary_of(50.0, 52.0, 51.0), paired,
                             context(teacher_small_images=True, teacher_epochs=None))
    assert "stem" not in text and "longer teacher" not in text


def test_reading_paragraph_weak_teacher_but_student_gain_says_both():
    paired = paired_of((-1.5, 0.01), (2.0, SIG), (0.5, NOT))
    text = reading_paragraph(summary_of(52.5, 52.0, 54.0), paired, context())
    assert "Distillation helped" in text and "+2.00 points linear" in text
    assert "teacher itself is not clearly better than the small baseline (+0.50" in text
    assert "significantly ahead on either protocol" in text
    assert "little to distil" not in text
    assert "a longer teacher pre-training (it had 8 epochs" in text
    assert "student beats its teacher significantly on both kNN and linear top-1" in text


def test_reading_paragraph_strong_teacher_weak_student_points_at_distillation():
    paired = paired_of((17.7, SIG), (0.3, NOT), (18.0, SIG))
    text = reading_paragraph(summary_of(70.0, 52.0, 52.3), paired, context(distill_epochs=5))
    assert "not significantly different from the baseline" in text
    assert "did not absorb it on either protocol" in text
    assert "more distillation epochs (distill.epochs = 5)" in text


def test_reading_paragraph_judges_by_the_paired_test_not_the_size_of_a_difference():
    # +0.3 points on the same 10,000 images but a small p: a real, if small, gain
    small_sure = reading_paragraph(summary_of(70.0, 60.0, 60.3),
                                   paired_of((9.7, SIG), (0.3, 1e-4), (10.0, SIG)), context())
    assert "Distillation helped" in small_sure
    assert "Teacher > SEED > baseline holds on both" in small_sure
    # +3 points that the paired test cannot tell from chance (e.g. few test images)
    big_unsure = reading_paragraph(summary_of(70.0, 60.0, 63.0),
                                   paired_of((7.0, SIG), (3.0, 0.2), (10.0, SIG)), context())
    assert "not significantly different from the baseline (+3.00 linear" in big_unsure
    assert "Distillation helped" not in big_unsure


def test_reading_paragraph_one_protocol_only():
    paired = paired_of((5.0, SIG), (4.0, SIG), (9.0, SIG),
                       knn={"student_vs_baseline": (0.4, NOT)})
    text = reading_paragraph(summary_of(70.0, 61.0, 65.0), paired, context())
    assert "significantly on linear only" in text
    assert "holds on linear top-1 only" in text
    assert "did not absorb it on both protocols" in text


def test_reading_paragraph_without_paired_tests_claims_nothing():
    text = reading_paragraph(summary_of(70.0, 60.0, 65.0), {}, context())
    assert "no paired test was run" in text
    assert "helped" not in text and "holds" not in text and "significant" not in text.replace(
        "called significant or not", "")


def holdout_metrics(k=10, t=0.07, k_edge=None, t_edge=None):
    return {"k": k, "temperature": t, "selected_on": "holdout",
            "configured": {"k": 20, "temperature": 0.07},
            "holdout": {"top1": 51.0, "top5": 81.0, "samples": 1000, "bank": 9000,
                        "grid_k": [10, 20], "grid_temperature": [0.03, 0.07],
                        "k_edge": k_edge, "temperature_edge": t_edge,
                        "grid_top1": {"k10_T0.07": 51.0, "k20_T0.07": 50.5}}}


def test_render_summary_md_states_what_was_chosen_on_the_holdout():
    knn = {m: metrics(50.0, 80.0, **holdout_metrics(k_edge="lowest")) for m in MODELS}
    linear = {m: metrics(60.0, 90.0, lr=0.1, mode="cached", epochs=100, selected_on="holdout",
                         holdout={"top1": 61.0, "top5": 91.0, "lr_edge": "lowest",
                                  "lr_top1": {"0.1": 61.0, "1": 60.0, "30": 55.0}})
              for m in MODELS}
    paired = paired_of((1.0, 0.001), (2.0, SIG), (3.0, SIG))
    md = render_summary_md(build_summary(knn, linear), {}, knn, linear, context(), 0.1,
                           {"a.json": 60.0, "b.json": 30.0}, {"curves": "../plots/c.png"},
                           paired)
    assert ("kNN k and T were chosen per model on a holdout split (10% of train, "
            "class-balanced") in md
    assert "from k ∈ {10, 20} × T ∈ {0.03, 0.07}" in md
    assert "SEED student k=10, T=0.07 (k lowest of its grid)" in md
    assert "lr was chosen per model on the same split from linear.lrs = {0.1, 1, 30}" in md
    assert ("The lr chosen for teacher, baseline and SEED student is at an end of the grid"
            in md)
    assert "extend knn.sweep_k / knn.sweep_temperature past that end" in md
    assert "scored once per model with the chosen values" in md
    assert ("| SEED | k=10, T=0.07 (k lowest of its grid) | 51.00 | k=20, T=0.07: 50.50 | "
            "0.1 (lowest of the grid) | 61.00 | 91.00 |") in md
    assert "| kNN | SEED − baseline | +2.00 | [+1.50, +2.50] | 120 / 100 | 1.0e-06 | yes |" in md
    assert "| linear | teacher − SEED | +1.00 | [+0.50, +1.50] | 120 / 100 | 0.001 | yes |" in md
    assert "Pipeline compute time: 90 s (1.5 min)" in md
    assert "## Reading the numbers" in md and "![curves](../plots/c.png)" in md


def test_render_summary_md_never_claims_an_untuned_knn_was_tuned():
    knn = {m: metrics(50.0, 80.0, k=20, temperature=0.07,
                      holdout={"top1": 51.0, "top5": 81.0, "sweep_top1": {"10": 52.0}})
           for m in MODELS}  # an old knn stage: configured k and T, sweep ignored
    linear = {m: metrics(60.0, 90.0, lr=1.0, mode="cached", epochs=100,
                         holdout={"top1": 61.0, "top5": 91.0, "lr_top1": {"0.1": 1, "1": 2,
                                                                           "10": 1}})
              for m in MODELS}
    md = render_summary_md(build_summary(knn, linear), {}, knn, linear, context(), 0.1, {}, {})
    assert "kNN k and T were chosen" not in md
    assert "kNN used the configured k and T, not tuned, for teacher, baseline and SEED" in md
    assert "k=20, T=0.07 (not tuned)" in md
    assert "at an end of the grid" not in md  # lr 1 is inside {0.1, 1, 10}
    assert "no paired test" in md


def test_paired_metrics_and_seeds_table():
    paired = paired_of((1.0, 0.001), (2.0, SIG), (3.0, SIG))
    flat = paired_metrics(paired)
    assert flat["paired.knn.student_vs_baseline.p_value"] == SIG
    assert flat["paired.linear.teacher_vs_student.ci_low"] == 0.5
    assert len(flat) == 2 * 3 * 4
    reproduce = {"seconds": 3000.0,
                 "teacher": {"arch": "resnet18d", "knn_top1": 80.0, "linear_top1": 84.0},
                 "students": {"mobilenetv3_small_050": {
                     "seed": {"knn_top1": [73.0, 74.0, 75.0], "linear_top1": [75.0, 76.0, 77.0]},
                     "baseline": {"knn_top1": [60.0, 60.0, 60.0],
                                  "linear_top1": [61.0, 60.0, 59.0]},
                     "paired": {"knn_top1": [comparison(13.0, SIG)] * 3,
                                "linear_top1": [comparison(16.0, SIG), comparison(16.0, 0.2),
                                                comparison(18.0, SIG)]}}}}
    table = seeds_table(check_reproduce(reproduce, "r.json")).splitlines()
    # per-seed recoveries 65%, 70%, 75%: mean 70%, 95% t-interval 70 +- 4.303 * 5 / sqrt(3)
    assert table[2] == ("| mobilenetv3_small_050 | kNN | 73.00 / 74.00 / 75.00 | 74.00 ± 1.00 | "
                        "60.00 / 60.00 / 60.00 | 60.00 ± 0.00 | +14.00 | 70% [58, 82] | "
                        "3 better (max p 1.0e-06), 0 worse, 0 not significant, of 3 seeds |")
    assert table[3].endswith("| +16.00 | 67% [53, 80] | 2 better (max p 1.0e-06), 0 worse, "
                             "1 not significant, of 3 seeds |")
    # a significant reversal is counted as one, never folded into "not significant"
    reversed_ = json.loads(json.dumps(reproduce))
    reversed_["students"]["mobilenetv3_small_050"]["paired"]["knn_top1"][2] = \
        comparison(-0.67, 0.039)
    row = seeds_table(check_reproduce(reversed_, "r.json")).splitlines()[2]
    assert row.endswith("| 2 better (max p 1.0e-06), 1 worse (p 0.039), 0 not significant, "
                        "of 3 seeds |")
    # a baseline within a point of the teacher: no share of a gap that is not there
    close = json.loads(json.dumps(reproduce))
    close["students"]["mobilenetv3_small_050"]["baseline"]["knn_top1"] = [79.5, 79.6, 79.7]
    row = seeds_table(check_reproduce(close, "r.json")).splitlines()[2]
    assert "| -5.60 | – (teacher − baseline +0.40) |" in row
    bad = json.loads(json.dumps(reproduce))
    bad["students"]["mobilenetv3_small_050"]["baseline"]["knn_top1"] = [60.0, 60.0]
    with pytest.raises(ValueError, match=r"r.json: 'students.mobilenetv3_small_050' lists of "
                                         r"different lengths \[2, 3\]"):
        check_reproduce(bad, "r.json")
    bad = json.loads(json.dumps(reproduce))
    bad["teacher"]["knn_top1"] = "80"
    with pytest.raises(ValueError, match="'teacher.knn_top1' must be a percentage"):
        check_reproduce(bad, "r.json")


# ----------------------------------------------------------------------------- readers


def test_read_training_log(tmp_path):
    assert read_training_log(tmp_path / "missing.csv") is None
    (tmp_path / "empty.csv").write_text("step,epoch,loss,lr\n")
    assert read_training_log(tmp_path / "empty.csv") is None
    (tmp_path / "ok.csv").write_text("step,epoch,loss,lr,agreement\n"
                                     "0,0,5.0,0.1,\n1,0,4.0,0.1,0.5\n")
    log = read_training_log(tmp_path / "ok.csv")
    assert log["loss"] == [5.0, 4.0] and math.isnan(log["agreement"][0])
    (tmp_path / "bad.csv").write_text("step,loss\n0,1\n")
    with pytest.raises(ValueError, match=r"bad.csv: header .* lacks columns \['epoch', 'lr'\]"):
        read_training_log(tmp_path / "bad.csv")
    (tmp_path / "text.csv").write_text("step,epoch,loss,lr\n0,0,5,0.1\n1,0,oops,0.1\n")
    with pytest.raises(ValueError, match=r"text.csv:3: column 'loss' is not a number"):
        read_training_log(tmp_path / "text.csv")


def test_stage_seconds_sums_stage_files_only(tmp_path):
    (tmp_path / "knn_a.json").write_text(json.dumps({"seconds": 2.5, "test": {"seconds": 9}}))
    (tmp_path / "distill.json").write_text(json.dumps({"seconds": 100}))
    (tmp_path / "summary.json").write_text(json.dumps({"seconds": 1000}))
    (tmp_path / "other.json").write_text(json.dumps({"top1": 3}))
    (tmp_path / "list.json").write_text("[1, 2]")
    found = stage_seconds(tmp_path, exclude=[tmp_path / "summary.json"])
    assert found == {"distill.json": 100.0, "knn_a.json": 2.5}


def test_read_model_meta_takes_method_from_a_converted_teachers_source(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"method": "moco_v2", "epochs": 8}))
    (tmp_path / "teacher.json").write_text(json.dumps({
        "format": "seed_distill", "arch": "resnet18",
        "source_path": str(tmp_path / "model.safetensors")}))
    meta = read_model_meta(tmp_path / "teacher.json")
    assert meta["method"] == "moco_v2" and meta["epochs"] == 8
    assert method_label(meta) == "MoCo-v2"
    assert read_model_meta(tmp_path / "absent.json") == {}


def test_read_metrics_names_the_missing_stage(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"knn_student.json: missing; run the `knn@student`"):
        read_metrics(tmp_path / "knn_student.json", "knn@student")


# ----------------------------------------------------------------------------- PCA


def test_pca_2d_matches_covariance_eigenvectors():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    scales = torch.tensor([10.0, 4.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    x = (torch.randn(500, 6, generator=g, dtype=torch.float64) * scales) @ basis.T + 3.0
    xy, ratio = pca_2d(x.float())
    cov = torch.cov(x.T)
    evals, evecs = torch.linalg.eigh(cov)
    top = evecs[:, [-1, -2]]
    expected = (x - x.mean(0)) @ top
    for j in range(2):  # eigenvectors are defined up to sign
        assert abs(float(torch.nn.functional.cosine_similarity(
            xy[:, j].double(), expected[:, j], dim=0))) > 0.9999
    torch.testing.assert_close(ratio.double(), (evals[[-1, -2]] / evals.sum()), rtol=1e-4,
                               atol=1e-6)
    xy2, _ = pca_2d(-x.float() + 7)
    torch.testing.assert_close(xy2.abs(), xy.abs(), rtol=1e-4, atol=1e-4)
    assert xy.shape == (500, 2)


def test_subsample_is_deterministic_and_sorted():
    a, b = subsample(1000, 50, 3), subsample(1000, 50, 3)
    assert torch.equal(a, b) and a.numel() == 50 and bool((a[1:] > a[:-1]).all())
    assert torch.equal(subsample(10, 50, 3), torch.arange(10))


def test_plots_render_pngs(tmp_path):
    log = {"step": [0, 1, 2], "epoch": [0, 0, 1], "loss": [3, 2, 1], "lr": [0.1, 0.1, 0.01],
           "agreement": [0.1, 0.2, 0.3]}
    plot_training_curves({"teacher pre-training": None, "distillation": log},
                                tmp_path / "curves.png")
    plot_per_class({"kNN": {"teacher": [50.0, None], "student": [40.0, 30.0]}},
                          ["cat", "dog"], tmp_path / "per_class.png")
    xy = torch.randn(20, 2)
    labels = torch.arange(20) % 3
    plot_embeddings({"t": (xy, labels, torch.tensor([0.5, 0.2])),
                            "s": (xy, labels, torch.tensor([0.4, 0.3]))}, None,
                           tmp_path / "proj.png")
    for name in ("curves.png", "per_class.png", "proj.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- stages


def load_stage(name):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PARAMS = """
data: {image_size: 16, workers: 0, holdout_fraction: 0.2}
features: {batch_size: 16}
knn: {k: 5, sweep_k: [1, 5, 10]}
linear: {epochs: 3, lrs: [0.01, 0.1], batch_size: 16}
"""


def save_stand_in(path, arch="resnet10t", seed=0, **extra):
    from seed_core.models.backbones import create_backbone
    from seed_core.models.encoder import Encoder
    from seed_core.models.heads import build_head, mlp_layout

    torch.manual_seed(seed)
    backbone = create_backbone(arch, small_images=True)
    encoder = Encoder(backbone, build_head(mlp_layout(backbone.num_features, 32, 8)))
    return save_encoder(path, encoder, **extra)


@pytest.fixture
def tiny_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(PARAMS)
    write_tiny_shards(tmp_path / "train", [30, 25, 15])
    write_tiny_shards(tmp_path / "val", [20, 12], seed=1)
    models = {"teacher": ("models/teacher/teacher.safetensors", {"fmt": "moco_v2"}),
              "baseline": ("models/pretrain/baseline/model.safetensors",
                           {"method": "moco_v2", "epochs": 2}),
              "student": ("models/student/model.safetensors",
                          {"method": "seed", "epochs": 2, "teacher_arch": "resnet10t"})}
    for seed, (name, (path, extra)) in enumerate(models.items()):
        save_stand_in(path, seed=seed, **extra)
    return tmp_path, {name: str(Path(path).parent) for name, (path, _) in models.items()}


class RecordingTracker:
    def __init__(self):
        self.metrics, self.parent, self.artifacts = {}, {}, []
        self.parent_artifacts, self.finished_at, self.model_tags = [], {}, {}

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_parent_metrics(self, metrics):
        self.parent.update(metrics)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append(Path(path).name)

    def log_parent_artifact(self, path):
        self.parent_artifacts.append(Path(path).name)

    def note_reused_stages(self, finished_at):
        self.finished_at = dict(finished_at)

    def log_model(self, *args, **kwargs):
        pass

    def tag_model_version(self, registered_name, metrics):
        self.model_tags[registered_name] = dict(metrics)

    def close(self, failed=False):
        self.failed = failed


def test_features_knn_linear_report_pipeline(tiny_pipeline, monkeypatch):
    root, models = tiny_pipeline
    features, knn, linear = load_stage("features"), load_stage("knn"), load_stage("linear")
    for name, model in models.items():
        features.main(["--model", model, "--train-shards", "train", "--val-shards", "val",
                       "--out", f"data/features/{name}", "--embeddings",
                       "--metrics", f"metrics/features_{name}.json"])
        knn.main(["--features", f"data/features/{name}", "--name", name,
                  "--metrics", f"metrics/knn_{name}.json",
                  "--predictions", f"data/predictions/knn_{name}.safetensors"])
        linear.main(["--name", name, "--features", f"data/features/{name}",
                     "--metrics", f"metrics/linear_{name}.json",
                     "--predictions", f"data/predictions/linear_{name}.safetensors"])

    from safetensors.torch import load_file
    val = load_file("data/features/student/val.safetensors")
    assert torch.equal(val["index"], torch.arange(32)) and val["features"].shape == (32, 512)
    assert torch.equal(val["labels"], torch.arange(32) % 4)
    torch.testing.assert_close(val["embeddings"].norm(dim=1), torch.ones(32))
    meta = json.loads(Path("data/features/student/meta.json").read_text())
    assert meta["train"] == {"shards": "train", "expected": 70, "received": 70,
                             "bad_samples": 0}
    assert meta["model"]["method"] == "seed" and meta["num_classes"] == 4

    # the stage's holdout numbers equal direct kNNs of holdout against the fit part, for the
    # configured pair and for the pair it chose (the best of the grid)
    train = load_file("data/features/student/train.safetensors")
    knn_metrics = json.loads(Path("metrics/knn_student.json").read_text())
    fit, hold = holdout_split(train["labels"], 0.2, 0)

    def holdout_top1(k, t):
        direct = knn_classify(train["features"][fit], train["labels"][fit],
                              train["features"][hold], k, t, 4)
        return topk_accuracy(direct, train["labels"][hold])["top1"]

    grid = knn_metrics["holdout"]["grid_top1"]
    assert set(grid) == {f"k{k}_T{t:g}" for k in (1, 5, 10) for t in (0.03, 0.07, 0.1, 0.2)}
    assert grid["k5_T0.07"] == pytest.approx(holdout_top1(5, 0.07))
    k, t = knn_metrics["k"], knn_metrics["temperature"]
    assert knn_metrics["holdout"]["top1"] == pytest.approx(holdout_top1(k, t))
    assert knn_metrics["holdout"]["top1"] == pytest.approx(max(grid.values()))
    assert knn_metrics["selected_on"] == "holdout"
    assert knn_metrics["configured"] == {"k": 5, "temperature": 0.07}
    assert set(knn_metrics) == {"name", "k", "temperature", "selected_on", "configured",
                                "holdout", "test", "per_class_top1", "seconds", "started_at",
                                "finished_at"}
    # the test split is scored once, with the chosen pair and the whole train as the bank
    val = load_file("data/features/student/val.safetensors")
    scores = knn_classify(train["features"], train["labels"], val["features"], k, t, 4)
    assert knn_metrics["test"]["top1"] == pytest.approx(topk_accuracy(scores,
                                                                      val["labels"])["top1"])
    predictions = load_predictions("data/predictions/knn_student.safetensors")
    assert torch.equal(predictions["index"], val["index"])
    assert torch.equal(predictions["label"], val["labels"])
    assert torch.equal(predictions["prediction"], scores.argmax(1))
    lin = json.loads(Path("metrics/linear_student.json").read_text())
    assert set(lin) == {"name", "mode", "epochs", "lr", "selected_on", "holdout", "test",
                        "per_class_top1", "seconds", "started_at", "finished_at"}
    assert set(lin["holdout"]["lr_top1"]) == {"0.01", "0.1"} and lin["lr"] in (0.01, 0.1)
    assert lin["holdout"]["lr_edge"] == {0.01: "lowest", 0.1: "highest"}[lin["lr"]]
    lin_pred = load_predictions("data/predictions/linear_student.safetensors")
    assert 100 * float((lin_pred["prediction"] == lin_pred["label"]).double().mean()) == \
        pytest.approx(lin["test"]["top1"])

    Path("plots").mkdir()
    Path("plots/distill.csv").write_text("step,epoch,loss,lr,target_off_positive,agreement\n"
                                         "0,0,5,0.1,3,0.2\n1,0,4,0.1,3,0.3\n")
    tracker = RecordingTracker()
    monkeypatch.setattr("seed_core.stagekit.start_tracking", lambda *a, **k: tracker)
    load_stage("report").main(["--val-shards", "val"])
    summary = json.loads(Path("metrics/summary.json").read_text())
    assert {m: sorted(v) for m, v in summary.items()} == {
        m: sorted(SUMMARY_KEYS) for m in ("teacher", "baseline", "student")}
    assert summary["student"]["linear_top1"] == lin["test"]["top1"]
    md = Path("reports/summary.md").read_text()
    assert "| SEED | resnet10t (small-image stem) | SEED | ✓ from resnet10t | 2 |" in md
    assert "## Reading the numbers" in md
    for png in ("training_curves.png", "per_class_accuracy.png", "embedding_projection.png"):
        assert Path("plots", png).read_bytes()[:4] == b"\x89PNG"
    assert tracker.parent["student.knn_top1"] == summary["student"]["knn_top1"]
    # the paired tests: every pair, both protocols, from the prediction files
    paired = json.loads(Path("metrics/paired.json").read_text())
    assert set(paired) == {"knn", "linear"}
    assert set(paired["knn"]) == {"teacher_vs_student", "student_vs_baseline",
                                  "teacher_vs_baseline"}
    student = load_predictions("data/predictions/knn_student.safetensors")
    baseline = load_predictions("data/predictions/knn_baseline.safetensors")
    want = mcnemar((student["prediction"] == student["label"]).numpy(),
                   (baseline["prediction"] == baseline["label"]).numpy())
    got = paired["knn"]["student_vs_baseline"]
    assert (got["a_only"], got["b_only"]) == (want.a_only, want.b_only)
    assert got["p_value"] == pytest.approx(want.p_value) and got["samples"] == 32
    assert got["difference"] == pytest.approx(summary["student"]["knn_top1"]
                                              - summary["baseline"]["knn_top1"])
    assert tracker.parent["paired.knn.student_vs_baseline.p_value"] == got["p_value"]
    # metrics/headline/: the rows `dvc metrics show` lists, equal to their sources
    rows = {path.stem: json.loads(path.read_text())
            for path in Path("metrics/headline").glob("*.json")}
    assert set(rows) == {"teacher", "baseline", "student", "seed_minus_baseline"}
    assert rows["student"] == {
        "knn": round(summary["student"]["knn_top1"], 2),
        "knn_holdout": round(knn_metrics["holdout"]["top1"], 2),
        "linear": round(summary["student"]["linear_top1"], 2),
        "linear_holdout": round(lin["holdout"]["top1"], 2)}  # no training stage: no train_s
    assert set(rows["teacher"]) == set(rows["baseline"]) == set(rows["student"])
    gain = rows["seed_minus_baseline"]
    assert set(gain) == {"knn", "knn_p", "linear", "linear_p"}
    assert gain["knn"] == round(got["difference"], 2)
    assert gain["knn_p"] == p_label(got["p_value"])  # text: DVC prints numbers to 5 decimals
    assert float(gain["knn_p"]) == pytest.approx(got["p_value"], rel=0.05)
    assert "## Paired tests (same test images)" in md and "| kNN | SEED − baseline |" in md
    assert "## Students over seeds" not in md
    # with `make reproduce`'s results the report adds the table over seeds
    Path("reproduce.json").write_text(json.dumps({
        "seconds": 60.0, "teacher": {"arch": "resnet10t", "knn_top1": 90.0, "linear_top1": 90.0},
        "students": {"resnet10t": {"seed": {"knn_top1": [80.0, 82.0], "linear_top1": [81.0, 83.0]},
                                   "baseline": {"knn_top1": [70.0, 70.0],
                                                "linear_top1": [71.0, 73.0]}}}}))
    load_stage("report").main(["--val-shards", "val", "--reproduce", "reproduce.json"])
    md = Path("reports/summary.md").read_text()
    assert "## Students over seeds" in md
    assert "| resnet10t | kNN | 80.00 / 82.00 | 81.00 ± 1.41 | 70.00 / 70.00 |" in md
    assert set(tracker.artifacts) == {"training_curves.png", "per_class_accuracy.png",
                                      "embedding_projection.png", "summary.md"}
    # the pipeline run holds the report too (MLflow compares the artifacts of parents)
    assert set(tracker.parent_artifacts) == set(tracker.artifacts)
    assert {"knn_student", "linear_teacher", "report"} <= set(tracker.finished_at)
    assert tracker.model_tags["seed-student"]["student.knn_top1"] == \
        summary["student"]["knn_top1"]


def test_linear_augmented_mode_and_holdout_exclusion(tiny_pipeline):
    root, models = tiny_pipeline
    Path("params.yaml").write_text(PARAMS.replace("linear: {", "linear: {mode: augmented, "))
    load_stage("features").main(["--model", models["baseline"], "--train-shards", "train",
                                 "--val-shards", "val", "--out", "feats"])
    linear = load_stage("linear")
    from seed_core.data.shardset import open_shards

    # the lr search's probe never sees a held-out sample (here: every sample of class 0)
    shards = open_shards("train")
    assert shards.samples == 70
    kept = np.flatnonzero(shards.index.labels != 0)
    flat = SimpleNamespace(features=lambda x: x.flatten(1))  # any frozen feature extractor
    batches = linear.augmented_batches(flat, shards, load_params("params.yaml"),
                                       torch.device("cpu"), kept)
    seen = [labels for _, labels in batches(0)] + [labels for _, labels in batches(1)]
    labels = torch.cat(seen)
    assert labels.numel() == 2 * (len(kept) // 8) * 8 and 0 not in labels.tolist()

    linear.main(["--name", "baseline", "--features", "feats", "--model", models["baseline"],
                 "--train-shards", "train", "--val-shards", "val", "--metrics", "lin.json"])
    out = json.loads(Path("lin.json").read_text())
    assert out["mode"] == "augmented" and set(out["holdout"]["lr_top1"]) == {"0.01", "0.1"}
    assert 0.0 <= out["test"]["top1"] <= 100.0


def test_features_under_torchrun_equals_single_process(tiny_pipeline):
    root, models = tiny_pipeline
    args = ["--model", models["student"], "--train-shards", "train", "--val-shards", "val"]
    load_stage("features").main([*args, "--out", "single"])
    env = {**os.environ, "SEED_TRACKING": "0"}
    done = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone",
                           "--nproc_per_node", "2", str(ROOT / "stages" / "features.py"),
                           *args, "--out", "multi"], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file
    for split in ("train", "val"):
        one, two = load_file(f"single/{split}.safetensors"), load_file(f"multi/{split}.safetensors")
        assert torch.equal(one["index"], two["index"]) and torch.equal(one["labels"],
                                                                        two["labels"])
        torch.testing.assert_close(one["features"], two["features"], rtol=1e-4, atol=1e-5)
    assert json.loads(Path("multi/meta.json").read_text())["world_size"] == 2
    assert not list(root.glob(".multi.*")), "temporary shares left behind"


# --- where a run's wall time goes --------------------------------------------------------------

def test_pipeline_timing_splits_the_wall_time() -> None:
    from seed_core.report.timing import pipeline_timing, timing_sentence

    times = {"a": {"started_at": 100.0, "finished_at": 110.0, "seconds": 8.0},
             "c": {"started_at": 113.0, "finished_at": 120.0, "seconds": 5.0},
             "b": {"started_at": 111.0, "finished_at": 112.0, "seconds": 0.5}}
    timing = pipeline_timing(times)
    # by hand: wall 100 -> 120; stages 13.5 s; processes 10 + 1 + 7 = 18 s; between 1 + 1 = 2 s
    assert timing == {"one_run": True, "stages": 3, "wall_seconds": 20.0, "stage_seconds": 13.5,
                      "overhead_seconds": 6.5, "startup_seconds": 4.5,
                      "between_stages_seconds": 2.0, "largest_gap_s": 1.0}
    assert "20 s (0.3 min) for 3 stages: 14 s inside the stages, 6 s of overhead" in \
        timing_sentence(timing)


def test_pipeline_timing_refuses_metrics_of_different_runs() -> None:
    from seed_core.report.timing import pipeline_timing, timing_sentence

    times = {"old": {"started_at": 0.0, "finished_at": 10.0, "seconds": 9.0},
             "new": {"started_at": 1000.0, "finished_at": 1010.0, "seconds": 9.0}}
    timing = pipeline_timing(times)
    assert timing["one_run"] is False and "wall_seconds" not in timing
    assert timing["largest_gap_between"] == ["old", "new"]
    assert "no wall time is claimed" in timing_sentence(timing)


def test_stage_metrics_record_their_process_start(tmp_path: Path) -> None:
    """`started_at` is the process's start (imports included), not the time of the call."""
    script = ("import time\ntime.sleep(0.6)\n"
              "from seed_core.stagekit import run_times\n"
              "t = run_times()\nprint(t['finished_at'] - t['started_at'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    assert 0.6 <= float(done.stdout) < 10.0
