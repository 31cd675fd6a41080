"""`make reproduce`'s summary stage on synthetic runs: the contract of metrics/reproduce.json,
the per-seed paired tests, and the goals judged on the right numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from seed_core.evaluation.predictions import save_predictions
from seed_core.models.encoder import build_encoder
from seed_core.report.readers import check_reproduce
from seed_core.report.reproduce import check_goals
from seed_core.teachers.canonical import save_encoder

ROOT = Path(__file__).resolve().parent.parent
N = 2000  # test images
LABELS = torch.arange(N) % 10


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(directory: Path, accuracy: dict[str, float], rng: np.random.Generator) -> None:
    """Metrics and predictions of a model right on about `accuracy` % of the images."""
    directory.mkdir(parents=True, exist_ok=True)
    for protocol, top1 in accuracy.items():
        right = torch.from_numpy(rng.random(N) < top1 / 100)
        prediction = torch.where(right, LABELS, (LABELS + 1) % 10)
        save_predictions(directory / f"{protocol}.safetensors", torch.arange(N), LABELS,
                         prediction)
        measured = 100.0 * float(right.double().mean())
        (directory / f"{protocol}.json").write_text(json.dumps(
            {"test": {"top1": measured, "top5": 100.0}, "seconds": 1.5}))


@pytest.fixture
def runs(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    seeds = [0, 1, 2]
    # a small student that SEED lifts a lot, a larger one it lifts a little
    plan = {"mobilenetv3_small_050": ({"knn": 60, "linear": 61}, {"knn": 73, "linear": 76}),
            "resnet10t": ({"knn": 78, "linear": 81}, {"knn": 79.5, "linear": 82.5})}
    for arch, (base, seed) in plan.items():
        for s in seeds:
            write_run(tmp_path / "runs" / arch / str(s) / "baseline", base, rng)
            write_run(tmp_path / "runs" / arch / str(s) / "seed", seed, rng)
            torch.manual_seed(s)
            save_encoder(tmp_path / "runs" / arch / str(s) / "seed" / "model" / "model",
                         build_encoder(arch, False, 16))
    teacher = tmp_path / "teacher"
    write_run(teacher, {"knn": 84, "linear": 87}, rng)
    (teacher / "teacher.json").write_text(json.dumps({"arch": "resnet18d"}))
    for protocol in ("knn", "linear"):
        (teacher / f"{protocol}.safetensors").rename(teacher / f"{protocol}_teacher.safetensors")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"reproduce": {"students": list(plan), "seeds": seeds}}))
    return {"root": tmp_path, "teacher": teacher, "params": params, "plan": plan}


def test_summary_follows_the_contract_and_judges_the_goals(runs) -> None:
    root, teacher = runs["root"], runs["teacher"]
    load_stage("reproduce").main([
        "--runs", str(root / "runs"), "--teacher-meta", str(teacher / "teacher.json"),
        "--teacher-knn", str(teacher / "knn.json"), "--teacher-linear",
        str(teacher / "linear.json"), "--teacher-predictions", str(teacher), "--out",
        str(root / "reproduce.json"), "--report", str(root / "reproduce.md"), "--params",
        str(runs["params"])])
    result = json.loads((root / "reproduce.json").read_text())
    check_reproduce(result, "reproduce.json")
    assert result["teacher"]["arch"] == "resnet18d" and result["seeds"] == [0, 1, 2]
    small = result["students"]["mobilenetv3_small_050"]
    assert len(small["seed"]["knn_top1"]) == 3 and small["seed"]["knn_top1"][0] == \
        json.loads((root / "runs/mobilenetv3_small_050/0/seed/knn.json").read_text())[
            "test"]["top1"]
    assert [t["significant"] for t in small["paired"]["linear_top1"]] == [True] * 3
    goals = result["goals"]
    assert goals["smallest_student"] == "mobilenetv3_small_050"  # by backbone parameters
    # the small student gains ~14 points, the larger ~1.5: the mean gain is about 7.7
    assert goals["mean_gain"]["knn_top1"] == pytest.approx(7.25, abs=1.5)
    assert goals["mean_gain_met"] is True
    # (73 - 60) / (84 - 60) = 54% of the gap on kNN: short of 75%
    assert goals["smallest_recovers"]["knn_top1"] == pytest.approx(13 / 24, abs=0.08)
    assert goals["recovery_met"] is False
    assert goals["teacher_beats_every_student_significantly"] is True
    # resnet10t's +1.5 points on 2,000 images is not significant on every seed
    assert goals["seed_beats_baseline_significantly_every_seed"] is False
    assert "| mobilenetv3_small_050 | kNN |" in (root / "reproduce.md").read_text()
    assert result["seconds"] > 0


def test_goals_use_seed_means_and_the_smallest_student() -> None:
    def tests(difference: float, p: float) -> list[dict]:
        return [{"difference": difference, "p_value": p}] * 2

    result = {"teacher": {"knn_top1": 80.0, "linear_top1": 82.0}, "students": {
        "a": {"seed": {"knn_top1": [76.0, 78.0], "linear_top1": [78.0, 80.0]},
              "baseline": {"knn_top1": [60.0, 60.0], "linear_top1": [62.0, 62.0]},
              "paired": {"knn_top1": tests(17, 1e-9), "linear_top1": tests(17, 1e-9)},
              "teacher_vs_seed": {"knn_top1": tests(3, 1e-4), "linear_top1": tests(3, 1e-4)}},
        "b": {"seed": {"knn_top1": [79.0, 79.0], "linear_top1": [81.0, 81.0]},
              "baseline": {"knn_top1": [78.0, 78.0], "linear_top1": [80.0, 80.0]},
              "paired": {"knn_top1": tests(1, 0.01), "linear_top1": tests(1, 0.2)},
              "teacher_vs_seed": {"knn_top1": tests(1, 0.3), "linear_top1": tests(1, 1e-3)}}}}
    goals = check_goals(result, {"a": 100, "b": 1000})
    assert goals["smallest_student"] == "a"
    assert goals["smallest_recovers"] == {"knn_top1": pytest.approx(17 / 20),
                                          "linear_top1": pytest.approx(17 / 20)}
    assert goals["recovery_met"] is True
    assert goals["mean_gain"] == {"knn_top1": pytest.approx(9.0),
                                  "linear_top1": pytest.approx(9.0)}
    assert goals["seed_beats_baseline_significantly_every_seed"] is False  # b linear p = 0.2
    assert goals["teacher_beats_every_student_significantly"] is False  # b kNN p = 0.3


def test_wall_seconds_spans_the_first_start_to_the_last_end(tmp_path: Path) -> None:
    from seed_core.report.reproduce import wall_seconds

    for name, start, end in (("r10/0/seed/train.json", 100.0, 160.0),
                             ("r10/0/seed/knn.json", 170.0, 171.0),
                             ("r10/1/baseline/train.json", 161.0, 230.5)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps({"seconds": end - start - 1, "started_at": start,
                                                 "finished_at": end}))
    assert wall_seconds(tmp_path) == 130.5
    (tmp_path / "r10/0/seed/model").mkdir()
    (tmp_path / "r10/0/seed/model/model.json").write_text(json.dumps({"arch": "r10"}))
    assert wall_seconds(tmp_path) == 130.5  # the model's metadata is not a stage's metrics
    (tmp_path / "r10/1/baseline/linear.json").write_text(json.dumps({"seconds": 3.0}))  # older
    assert wall_seconds(tmp_path) is None
