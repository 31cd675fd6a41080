"""`stages/teacher.py` as a command: every layout round-trips, bad input exits non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import png_bytes
from seed_core.data.transforms import eval_transform
from seed_core.io import sha256_file
from seed_core.models.backbones import create_backbone
from seed_core.models.encoder import Encoder
from seed_core.models.heads import build_head, mlp_layout
from seed_core.precision import normalize_images
from seed_core.teachers.canonical import load_canonical, save_encoder
from seed_core.teachers.verify import judge_teacher
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


def test_cli_records_the_knn_check_in_metrics_not_in_the_model(tmp_path: Path,
                                                               tiny_shards: Path) -> None:
    case = make_moco(tmp_path, v2=True)
    out = tmp_path / "out"
    done = run_stage("--checkpoint", str(case.path), "--arch", "resnet18", "--out", str(out),
                     "--shards", str(tiny_shards), "--verify-samples", "60", "--image-size", "32",
                     "--metrics", str(tmp_path / "m.json"), "--no-verify-gate")
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "teacher.json").read_text())
    assert not [k for k in meta if k.startswith("knn_")]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["knn_chance"] == 25.0  # 4 classes in the tiny shards
    assert metrics["knn_fit_samples"] + metrics["knn_heldout_samples"] == 60
    assert metrics["knn_gate_p"] == 0.01 and metrics["knn_min_gap"] == 2.0
    assert metrics["arch"] == "resnet18" and metrics["format"] == "moco_v2"
    # the verdict is consistent with its numbers
    verdict = metrics["knn_p_value"] < 0.01 and metrics["knn_gap"] >= 2.0
    assert metrics["knn_verified"] is verdict and bool(metrics["knn_failures"]) is not verdict


# ----------------------------------------------------------------------------- the kNN gate


def test_judge_teacher_needs_significance_and_a_margin() -> None:
    def cells(teacher_only: int, random_only: int, both: int, neither: int):
        teacher = [1] * teacher_only + [0] * random_only + [1] * both + [0] * neither
        random = [0] * teacher_only + [1] * random_only + [1] * both + [0] * neither
        return teacher, random

    # 10 of 10 disagreements favour the teacher: one-sided p = 2^-10 < 0.01, gap 2.5 points
    ok = judge_teacher(*cells(10, 0, 300, 90))
    assert ok.passed and ok.p_value == pytest.approx(2 ** -10) and ok.gap == pytest.approx(2.5)
    # 6 of 6: p = 1/64 > 0.01 although the gap is 1.5 points on 400 images
    weak = judge_teacher(*cells(6, 0, 300, 94))
    assert not weak.passed and weak.p_value == pytest.approx(1 / 64)
    assert "p = 0.0156 (needs < 0.01; 6 images only the teacher" in weak.reasons[0]
    # 10,000 images: +1.5 points is highly significant but below the 2-point margin
    small = judge_teacher(*cells(300, 150, 7000, 2550))
    assert small.p_value < 1e-10 and not small.passed
    assert small.reasons == ("gap +1.50 points (needs >= 2)",)
    # the committed default teacher, 75.25% (301) vs 65.5% (262) on 400 held-out images, passes
    # however the disagreements fall: at most 99 images can favour the random network
    for random_only in range(0, 100):
        verdict = judge_teacher(*cells(random_only + 39, random_only, 262 - random_only,
                                       99 - random_only))
        assert verdict.passed and verdict.gap == pytest.approx(9.75)
    assert verdict.p_value == pytest.approx(0.0066, abs=2e-4)  # the worst case


def quadrant_images(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise images with one bright 4x4 square in the quadrant given by the class (4 classes):
    position, which an untrained network's pooled features blur, decides the class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.integers(0, 120, (n, size, size)).astype(np.float64)
    half = size // 2
    for image, label in zip(images, labels):
        y = (label // 2) * half + rng.integers(0, half - 4)
        x = (label % 2) * half + rng.integers(0, half - 4)
        image[y:y + 4, x:x + 4] += rng.uniform(80, 135)
    return np.clip(images, 0, 255).astype(np.uint8), labels


def write_shards(root: Path, images: np.ndarray, labels: np.ndarray, per_shard: int = 200) -> Path:
    """WebDataset shards + manifest in the layout of `conftest.write_tiny_shards`."""
    import webdataset as wds

    root.mkdir(parents=True)
    shards = []
    for no, start in enumerate(range(0, len(labels), per_shard)):
        name = f"shard-{no:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(start, min(start + per_shard, len(labels))):
                sink.write({"__key__": f"s{i:05d}", "png": png_bytes(images[i]),
                            "cls": str(int(labels[i])).encode(),
                            "json": json.dumps({"key": f"s.{i}", "line": i + 1}).encode()})
        shards.append({"name": name, "samples": min(per_shard, len(labels) - start)})
    (root / "manifest.json").write_text(json.dumps({
        "samples": len(labels), "skipped": [], "num_classes": 4, "shards": shards,
        "source": {"path": "synthetic", "bytes": 0, "sha256": ""}}))
    return root


def trained_teacher(images: np.ndarray, labels: np.ndarray, steps: int = 10) -> Encoder:
    """A resnet10t trained briefly (supervised) on the images as the evaluation sees them."""
    transform = eval_transform(16)
    x = normalize_images(torch.stack([transform(torch.from_numpy(im)[None]) for im in images]))
    y = torch.from_numpy(labels)
    torch.manual_seed(1)  # not the verification's random-init seed (0)
    backbone = create_backbone("resnet10t", small_images=False)
    classifier = torch.nn.Linear(backbone.num_features, 4)
    optimizer = torch.optim.SGD([*backbone.parameters(), *classifier.parameters()], lr=0.05,
                                momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    backbone.train()
    for _ in range(steps):
        rows = torch.randint(0, len(y), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(classifier(backbone(x[rows])), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Encoder(backbone, build_head(mlp_layout(backbone.num_features, 64, 16))).eval()


def scrambled(encoder: Encoder, seed: int = 0) -> Encoder:
    """The same tensors with their entries shuffled: every shape and statistic of the values
    kept, what was learnt destroyed (a checkpoint mangled on the way in)."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.flatten()[torch.randperm(v.numel(), generator=generator)].view_as(v)
             if v.is_floating_point() else v for k, v in encoder.state_dict().items()}
    copy_ = Encoder(create_backbone("resnet10t", small_images=False),
                    build_head(mlp_layout(encoder.backbone.num_features, 64, 16)))
    copy_.load_state_dict(state)
    return copy_.eval()


@pytest.fixture(scope="module")
def quadrant_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("quadrants")
    images, labels = quadrant_images(600)
    shards = write_shards(root / "shards", images, labels)
    teacher = trained_teacher(images, labels)
    save_encoder(root / "trained.safetensors", teacher, method="moco_v2")
    save_encoder(root / "scrambled.safetensors", scrambled(teacher), method="moco_v2")
    return root, shards


def verify(root: Path, shards: Path, name: str, out: str, *extra: str):
    return run_stage("--checkpoint", str(root / f"{name}.safetensors"), "--arch", "resnet10t",
                     "--out", str(root / out), "--shards", str(shards), "--verify-samples", "600",
                     "--image-size", "16", "--metrics", str(root / f"{out}.json"), *extra)


def test_cli_passes_a_trained_teacher(quadrant_case) -> None:
    root, shards = quadrant_case
    done = verify(root, shards, "trained", "ok")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((root / "ok.json").read_text())
    assert metrics["knn_verified"] is True and metrics["knn_failures"] == []
    assert metrics["knn_p_value"] < 1e-6 and metrics["knn_gap"] > 20.0
    assert metrics["knn_heldout_samples"] == 120
    assert (root / "ok" / "teacher.safetensors").is_file()


def test_cli_fails_a_scrambled_teacher(quadrant_case) -> None:
    root, shards = quadrant_case
    done = verify(root, shards, "scrambled", "bad")
    assert done.returncode == 1
    assert "is not clearly better than the same architecture randomly initialised" in done.stderr
    assert "on 120 held-out training images" in done.stderr and "needs < 0.01" in done.stderr
    assert "--no-verify-gate" in done.stderr and "Traceback" not in done.stderr
    assert not (root / "bad").exists()  # no model written
    metrics = json.loads((root / "bad.json").read_text())  # the numbers behind the refusal
    assert metrics["knn_verified"] is False and metrics["knn_p_value"] >= 0.01
    # the gate can be lifted, the numbers are still recorded
    lifted = verify(root, shards, "scrambled", "lifted", "--no-verify-gate")
    assert lifted.returncode == 0, lifted.stderr
    assert json.loads((root / "lifted.json").read_text())["knn_verified"] is False


def test_model_files_do_not_change_with_the_knn_check(quadrant_case) -> None:
    """A kNN edit must not re-run distillation: the teacher files do not depend on the check."""
    root, shards = quadrant_case
    assert verify(root, shards, "trained", "a", "--verify-samples", "400").returncode == 0
    assert verify(root, shards, "trained", "b").returncode == 0
    assert (json.loads((root / "a.json").read_text())["knn_heldout_samples"]
            != json.loads((root / "b.json").read_text())["knn_heldout_samples"])
    for name in ("teacher.safetensors", "teacher.json"):
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes()


def test_cli_from_params_reads_the_checkpoint_file_dvc_tracks(tmp_path: Path) -> None:
    """`teacher.checkpoint` may name the pipeline's own file (a real DVC dependency)."""
    torch.manual_seed(0)
    encoder = Encoder(create_backbone("resnet18", small_images=True),
                      build_head(mlp_layout(512, 512, 16))).eval()
    own = "models/pretrain/teacher/model.safetensors"
    save_encoder(tmp_path / own, encoder, method="moco_v2")
    _write_params(tmp_path / "params.yaml", {"checkpoint": own, "arch": "resnet18"})
    done = run_stage("--from-params", "--out", "models/teacher", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "models/teacher/teacher.json").read_text())
    assert meta["source_path"] == own
    (tmp_path / own).unlink()
    missing = run_stage("--from-params", "--out", "models/teacher", cwd=tmp_path)
    assert missing.returncode != 0 and "stage pretrain@teacher must run first" in missing.stderr
    _write_params(tmp_path / "params.yaml", {"checkpoint": "elsewhere.pth", "arch": "resnet18"})
    external = run_stage("--from-params", "--out", "models/teacher", cwd=tmp_path)
    assert "elsewhere.pth: no such teacher checkpoint (fix teacher.checkpoint" in external.stderr
