"""`stages/teacher.py` as a command: every layout round-trips, bad input exits non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from seed_core.io import sha256_file
from seed_core.models.backbones import create_backbone
from seed_core.models.encoder import Encoder
from seed_core.models.heads import build_head, mlp_layout
from seed_core.teachers.canonical import load_canonical, save_encoder
from test_checkpoints import MAKERS, assert_same_encoder, make_moco, resnet18

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "stages" / "teacher.py"


def run_stage(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEED_TRACKING": "0"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_cli_round_trips_every_format(fmt: str, tmp_path: Path) -> None:
    case = MAKERS[fmt](tmp_path)
    out = tmp_path / "teacher_out"
    done = run_stage("--checkpoint", str(case.path), "--arch", "resnet18", "--out", str(out),
                     "--metrics", str(tmp_path / "metrics.json"))
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "teacher.json").read_text())
    assert meta["format"] == fmt and meta["arch"] == "resnet18"
    assert meta["head"] is (case.layout is not None) and meta["head_layout"] == case.layout
    assert meta["embed_dim"] == (case.head_out.shape[1] if case.head_out is not None else 512)
    assert meta["source_sha256"] == sha256_file(case.path)
    assert meta["source_path"] == str(case.path)
    encoder, loaded = load_canonical(out / "teacher.safetensors")
    assert loaded == meta
    assert_same_encoder(encoder, case)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["feature_dim"] == 512 and metrics["embed_dim"] == meta["embed_dim"]


def test_cli_wrong_arch_exits_with_key_names(tmp_path: Path) -> None:
    case = make_moco(tmp_path, v2=True)
    done = run_stage("--checkpoint", str(case.path), "--arch", "resnet34", "--out",
                     str(tmp_path / "out"))
    assert done.returncode != 0
    assert "resnet34" in done.stderr and "layer1.2.bn1.bias" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "teacher.safetensors").exists()


def test_cli_forced_format(tmp_path: Path) -> None:
    case = make_moco(tmp_path, v2=True)
    ok = run_stage("--checkpoint", str(case.path), "--arch", "resnet18", "--out",
                   str(tmp_path / "ok"), "--format", "moco_v2")
    assert ok.returncode == 0, ok.stderr
    wrong = run_stage("--checkpoint", str(case.path), "--arch", "resnet18", "--out",
                      str(tmp_path / "wrong"), "--format", "dino")
    assert wrong.returncode != 0
    assert "not a dino checkpoint" in wrong.stderr and "auto-detection says moco_v2" in \
        wrong.stderr
    unknown = run_stage("--checkpoint", str(case.path), "--arch", "resnet18", "--out",
                        str(tmp_path / "x"), "--format", "mocov2")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


class Payload:
    """Unpickling this calls open(marker, "w"): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_cli_refuses_code_executing_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": resnet18().state_dict(), "hook": Payload(marker)}, path)
    done = run_stage("--checkpoint", str(path), "--arch", "resnet18", "--out",
                     str(tmp_path / "out"))
    assert done.returncode != 0
    assert "refused" in done.stderr and "Nothing from the file was executed" in done.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def _write_params(path: Path, teacher: dict) -> None:
    path.write_text(yaml.safe_dump({"teacher": teacher}))


def test_cli_from_params_uses_pretrained_teacher(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = Encoder(create_backbone("resnet18", small_images=True),
                      build_head(mlp_layout(512, 512, 16))).eval()
    save_encoder(tmp_path / "models/pretrain/teacher/model.safetensors", encoder,
                 method="moco_v2")
    _write_params(tmp_path / "params.yaml", {"checkpoint": "", "arch": "resnet18"})
    done = run_stage("--from-params", "--out", "models/teacher", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "models/teacher/teacher.json").read_text())
    assert meta["format"] == "seed_distill" and meta["small_images"] is True
    assert meta["source_path"].endswith("models/pretrain/teacher/model.safetensors")
    loaded, _ = load_canonical(tmp_path / "models/teacher")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x))


def test_cli_from_params_external_checkpoint_and_overrides(tmp_path: Path) -> None:
    case = make_moco(tmp_path, v2=False)
    _write_params(tmp_path / "params.yaml", {"checkpoint": str(case.path), "arch": "resnet34",
                                             "format": "moco_v1"})
    wrong = run_stage("--from-params", "--out", "t", cwd=tmp_path)
    assert wrong.returncode != 0 and "resnet34" in wrong.stderr  # teacher.arch was read
    done = run_stage("--from-params", "--arch", "resnet18", "--out", "t", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "t/teacher.json").read_text())["format"] == "moco_v1"


def test_cli_from_params_errors_are_clear(tmp_path: Path) -> None:
    no_params = run_stage("--from-params", "--out", "t", cwd=tmp_path)
    assert no_params.returncode != 0 and "no such params file" in no_params.stderr
    _write_params(tmp_path / "params.yaml", {"checkpoint": "", "arch": "resnet18"})
    no_teacher = run_stage("--from-params", "--out", "t", "--pretrained-dir", "nowhere",
                           cwd=tmp_path)
    assert no_teacher.returncode != 0
    assert "nowhere: no such teacher checkpoint" in no_teacher.stderr
    assert "pretrain@teacher" in no_teacher.stderr and "Traceback" not in no_teacher.stderr


def test_cli_needs_checkpoint_and_arch(tmp_path: Path) -> None:
    done = run_stage("--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "--checkpoint and --arch are required" in done.stderr


def test_cli_verifies_with_knn_on_shards(tmp_path: Path, tiny_shards: Path) -> None:
    case = make_moco(tmp_path, v2=True)
    out = tmp_path / "out"
    done = run_stage("--checkpoint", str(case.path), "--arch", "resnet18", "--out", str(out),
                     "--shards", str(tiny_shards), "--verify-samples", "60", "--image-size", "32",
                     "--metrics", str(tmp_path / "m.json"))
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "teacher.json").read_text())
    assert meta["knn_chance"] == 25.0  # 4 classes in the tiny shards
    assert 0.0 <= meta["knn_top1"] <= 100.0 and 0.0 <= meta["knn_top1_random_init"] <= 100.0
    assert meta["knn_fit_samples"] + meta["knn_heldout_samples"] == 60
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["knn_top1"] == meta["knn_top1"]
