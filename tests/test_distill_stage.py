"""The distill stage end to end on tiny data: output form, and exact resume after kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_tiny_shards
from seed_core.models.backbones import create_backbone
from seed_core.models.heads import build_head, mlp_layout
from seed_core.teachers.canonical import load_canonical, save_canonical

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "data": {"image_size": 16, "workers": 1},
    "student": {"arch": "resnet10t"},
    "distill": {"epochs": 2, "batch_size": 8, "queue_size": 24, "checkpoint_every": 3,
                "log_every": 2, "warmup_epochs": 0.5, "t_teacher": 0.05, "hidden_dim": 32},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distill")
    shards = write_tiny_shards(root / "shards", [30, 25, 15])  # 70 samples: 8 steps/epoch
    torch.manual_seed(0)
    backbone = create_backbone("resnet10t")
    head = build_head(mlp_layout(backbone.num_features, 32, 16))
    teacher = save_canonical(root / "teacher" / "teacher.safetensors", backbone.state_dict(),
                             head.state_dict(), {"format": "seed_distill", "arch": "resnet10t"})
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(TINY))
    return {"root": root, "shards": shards, "teacher": teacher, "params": params}


def run_distill(setup: dict, name: str, crash_after: int | None = None,
                **extra: str) -> subprocess.CompletedProcess:
    root = setup["root"]
    env = {**os.environ, "SEED_TRACKING": "0", "SEED_NUM_THREADS": "1"}
    env.pop("SEED_CRASH_AFTER_STEP", None)
    if crash_after is not None:
        env["SEED_CRASH_AFTER_STEP"] = str(crash_after)
    cmd = [sys.executable, str(ROOT / "stages" / "distill.py"), "--teacher",
           str(setup["teacher"]), "--shards", str(setup["shards"]), "--out",
           str(root / name / "student"), "--curves", str(root / name / "distill.csv"),
           "--metrics", str(root / name / "metrics.json"), "--params", str(setup["params"]),
           "--checkpoint-dir", str(root / name / "ckpt"), "--no-mlflow-model"]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", value]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=root)


def test_output_is_canonical_and_logs_curves(setup: dict) -> None:
    done = run_distill(setup, "plain")
    assert done.returncode == 0, done.stderr[-3000:]
    out = setup["root"] / "plain"
    student, meta = load_canonical(out / "student")
    assert meta["method"] == "seed" and meta["arch"] == "resnet10t"
    assert meta["embed_dim"] == 16 and meta["teacher_arch"] == "resnet10t"
    assert student(torch.randn(2, 3, 16, 16)).shape == (2, 16)
    rows = (out / "distill.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,lr,queue_entropy,agreement"
    assert len(rows) == 1 + 16 // 2  # a row every log_every=2 of 16 steps
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_run"] == 16 and metrics["decode_errors"] == 0
    assert not (out / "ckpt" / "last.pt").exists()  # cleared once the student is written


def test_resume_after_kill_gives_identical_weights(setup: dict) -> None:
    reference = run_distill(setup, "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    crashed = run_distill(setup, "crashy", crash_after=7)  # last checkpoint after step 6
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    state = torch.load(setup["root"] / "crashy" / "ckpt" / "last.pt", weights_only=True)
    assert state["position"] == {"epoch": 0, "step": 6}
    assert not (setup["root"] / "crashy" / "student").exists()

    resumed = run_distill(setup, "crashy")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert json.loads((setup["root"] / "crashy" / "metrics.json").read_text())["steps_run"] == 10

    a = load_file(str(setup["root"] / "reference" / "student" / "model.safetensors"))
    b = load_file(str(setup["root"] / "crashy" / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the curves survive the crash too
    assert (setup["root"] / "crashy" / "distill.csv").read_text() == \
        (setup["root"] / "reference" / "distill.csv").read_text()


def test_queue_init_from_cache_needs_the_cache(setup: dict, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**TINY, "distill": {**TINY["distill"],
                                                          "queue_init": "cache"}}))
    done = run_distill({**setup, "params": params}, "nocache")
    assert done.returncode != 0
    assert "distill.queue_init is 'cache' but no --teacher-cache was given" in done.stderr
