"""bench/bench_linear.py drives the real linear stage in both modes on tiny synthetic inputs."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_tiny_shards
from seed_core.models.backbones import create_backbone
from seed_core.models.encoder import Encoder
from seed_core.models.heads import build_head, mlp_layout
from seed_core.teachers.canonical import save_encoder

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data": {"image_size": 16, "workers": 0, "holdout_fraction": 0.2},
        "features": {"batch_size": 16},
        "linear": {"epochs": 2, "lrs": [0.01, 0.1], "batch_size": 16}}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(TINY))
    write_tiny_shards(tmp_path / "train", [30, 25, 15])
    write_tiny_shards(tmp_path / "val", [20, 12], seed=1)
    torch.manual_seed(0)
    backbone = create_backbone("resnet10t", small_images=True)
    save_encoder("model/model.safetensors",
                 Encoder(backbone, build_head(mlp_layout(backbone.num_features, 32, 8))),
                 method="moco_v2", epochs=1)
    load(ROOT / "stages" / "features.py", "stage_features").main(
        ["--model", "model", "--train-shards", "train", "--val-shards", "val", "--out", "feats"])
    return tmp_path


def test_bench_linear_runs_both_modes_and_compares(inputs, capsys, monkeypatch):
    monkeypatch.setenv("SEED_TRACKING", "0")
    bench = load(ROOT / "bench" / "bench_linear.py", "bench_linear")
    bench.main(["--features", "feats", "--model", "model", "--train-shards", "train",
                "--val-shards", "val", "--params", "params.yaml", "--set", "linear.epochs=1",
                "--workdir", "work"])
    report = json.loads(capsys.readouterr().out)
    runs = report["runs"]
    assert set(runs) == {"cached", "augmented"}
    for mode, run in runs.items():
        written = yaml.safe_load(Path(f"work/params_{mode}.yaml").read_text())
        assert written["linear"]["mode"] == mode and written["linear"]["epochs"] == 1
        assert run["epochs"] == 1 and 0.0 <= run["test_top1"] <= 100.0
        assert run["stage_seconds"] > 0 and run["wall_seconds"] >= run["stage_seconds"]
    assert report["speedup"] == pytest.approx(
        runs["augmented"]["stage_seconds"] / runs["cached"]["stage_seconds"], rel=0.01)
    assert report["top1_cached_minus_augmented"] == pytest.approx(
        runs["cached"]["test_top1"] - runs["augmented"]["test_top1"], abs=0.01)
    assert report["top1_goal_met"] == (abs(report["top1_cached_minus_augmented"]) <= 1.5)


def test_bench_linear_refuses_to_override_the_mode(inputs):
    bench = load(ROOT / "bench" / "bench_linear.py", "bench_linear")
    with pytest.raises(SystemExit, match="runs both modes itself"):
        bench.main(["--features", "feats", "--model", "model", "--train-shards", "train",
                    "--val-shards", "val", "--set", "linear.mode=cached"])
    with pytest.raises(SystemExit, match="expected SECTION.KEY=VALUE"):
        bench.main(["--features", "feats", "--model", "model", "--train-shards", "train",
                    "--val-shards", "val", "--set", "epochs=3"])


def test_a_failing_stage_run_is_reported_with_its_output(inputs, monkeypatch):
    monkeypatch.setenv("SEED_TRACKING", "0")
    bench = load(ROOT / "bench" / "bench_linear.py", "bench_linear")
    with pytest.raises(SystemExit, match="cached mode failed"):
        bench.main(["--features", "missing", "--model", "model", "--train-shards", "train",
                    "--val-shards", "val", "--params", "params.yaml"])
