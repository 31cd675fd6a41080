"""The bad-input catalogue, injected from outside: each fault is put into a file or the process
limits of a real stage command, which must exit with its documented status and one line that
names the file, line, key or value and says what to do, with no traceback and no half-written
output. (Bad TSV rows, shards and manifests are in tests/test_shards.py and tests/test_data.py.)
"""

from __future__ import annotations

import json
import re
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from seed_core.models.backbones import create_backbone
from test_fashion_mnist import make_source

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str, cwd: Path, fsize: int | None = None
        ) -> subprocess.CompletedProcess:
    """Run `stages/<script>.py`; `fsize` caps the size of any file it writes (RLIMIT_FSIZE):
    Python ignores SIGXFSZ, so a write past it fails with EFBIG like a full disk."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "SEED_TRACKING": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{script}.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit if fsize is not None else None)


def error_line(done: subprocess.CompletedProcess, status: int = 1) -> str:
    """The one line the stage printed for a user error (the rest of stderr is its log)."""
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, done.stderr
    return errors[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (hidden temporaries included)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Files and temporaries under `root` (an empty parent directory of an output is fine)."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() or p.name.startswith("."))


def fmnist_args(root: Path, params: Path) -> list[str]:
    return ["--params", str(params), "--out", str(root / "data" / "fashion_mnist"),
            "--metrics", str(root / "metrics" / "fashion_mnist.json")]


@pytest.fixture
def fmnist(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Fashion-MNIST source and a params file that converts it."""
    source = make_source(tmp_path / "source", n_train=40, n_test=20)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source_dir": str(source), "limit_train": 20}}))
    return tmp_path, params


# --- params -------------------------------------------------------------------------------

@pytest.mark.parametrize("section, key, value, message", [
    ("distill", "epoch", 3, r"unknown key 'distill\.epoch' \(known keys of 'distill': "),
    ("distill", "epochs", "six", r"'distill\.epochs' must be int, got str 'six'"),
    ("pretrain", "log_every", 0, r"'pretrain\.log_every' must be >= 1 .*, got 0"),
    ("distill", "lr", -0.03, r"'distill\.lr' must be > 0 \(per 256 images\), got -0\.03"),
    ("pretrain", "momentum", -0.9, r"'pretrain\.momentum' must be in \[0, 1\), got -0\.9"),
    ("distill", "weight_decay", -1e-4, r"'distill\.weight_decay' must be >= 0"),
    ("pretrain", "warmup_epochs", -1.0, r"'pretrain\.warmup_epochs' must be in \[0, "),
    ("knn", "sweep_k", [10, 0], r"'knn\.sweep_k' entries must be >= 1"),
])
def test_bad_params_stop_a_stage_before_it_writes(fmnist, section: str, key: str, value: object,
                                                 message: str) -> None:
    root, params = fmnist
    raw = yaml.safe_load(params.read_text())
    raw[section] = {key: value}
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    line = params.read_text().splitlines().index(f"{section}:") + 2  # the key under it
    error = error_line(run("fashion_mnist", *fmnist_args(root, params), cwd=root))
    assert error.startswith(f"fashion_mnist: error: {params}:{line}: params: ")
    assert re.search(message, error), error
    assert leftovers(root / "data") == [] and not (root / "metrics").exists()


def test_bad_params_in_a_stage_of_the_common_frame(tmp_path: Path) -> None:
    """`launch.stage` (knn, features, pretrain, ...) reports params errors the same way."""
    params = tmp_path / "params.yaml"
    params.write_text("knn:\n  k: 20\n  temperature: -0.07\n")
    done = run("knn", "--name", "student", "--features", str(tmp_path / "features"),
               "--metrics", str(tmp_path / "knn.json"), "--params", str(params), cwd=tmp_path)
    error = error_line(done)
    assert error.startswith(f"knn@student: error: {params}:3: params: 'knn.temperature' must be")
    assert not (tmp_path / "knn.json").exists()


def write_features(directory: Path, n_train: int = 60, n_val: int = 20) -> Path:
    gen = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        save_file({"features": torch.randn(n, 8, generator=gen), "labels": torch.arange(n) % 4,
                   "index": torch.arange(n)}, str(directory / f"{split}.safetensors"))
    return directory


def test_knn_k_above_the_bank_stops_the_knn_stage(tmp_path: Path) -> None:
    features = write_features(tmp_path / "features")  # 60 train rows, 48 beside the holdout
    params = tmp_path / "params.yaml"
    params.write_text("data: {holdout_fraction: 0.2}\nknn: {k: 50, sweep_k: [5]}\n")
    done = run("knn", "--name", "student", "--features", str(features), "--metrics",
               str(tmp_path / "knn.json"), "--params", str(params), cwd=tmp_path)
    error = error_line(done)
    assert ("params: knn k [50] exceed(s) the kNN bank of 48 training samples (train minus the "
            "holdout split); lower knn.k / knn.sweep_k below 49 or raise data.limit_train") in error
    assert not (tmp_path / "knn.json").exists()


def test_a_usage_error_exits_2(tmp_path: Path) -> None:
    done = run("knn", "--name", "student", cwd=tmp_path)
    assert done.returncode == 2 and "the following arguments are required" in done.stderr


def test_limit_above_the_data_names_the_key(fmnist) -> None:
    root, params = fmnist
    params.write_text(params.read_text().replace("limit_train: 20", "limit_train: 41"))
    error = error_line(run("fashion_mnist", *fmnist_args(root, params), cwd=root))
    assert ("params: 'data.limit_train' limit 41 exceeds the 40 available samples; lower it "
            "(0 = all)") in error
    assert leftovers(root / "data") == [] and not (root / "metrics").exists()


# --- input files --------------------------------------------------------------------------

def test_missing_fashion_mnist_file_names_it_and_the_fix(fmnist) -> None:
    root, params = fmnist
    (root / "source" / "train-labels-idx1-ubyte.gz").unlink()
    error = error_line(run("fashion_mnist", *fmnist_args(root, params), cwd=root))
    assert (f"fashion_mnist: error: {root / 'source' / 'train-labels-idx1-ubyte.gz'}: "
            "Fashion-MNIST file not found; install it with `apt-get install "
            "dataset-fashion-mnist` or point `data.source_dir`") in error
    assert leftovers(root / "data") == [] and not (root / "metrics").exists()


def test_truncated_fashion_mnist_file_keeps_the_previous_output(fmnist) -> None:
    root, params = fmnist
    assert run("fashion_mnist", *fmnist_args(root, params), cwd=root).returncode == 0
    before = tree(root / "data")
    images = root / "source" / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-100])
    error = error_line(run("fashion_mnist", *fmnist_args(root, params), cwd=root))
    assert f"{images}: not a complete gzip file" in error and "reinstall it" in error
    assert tree(root / "data") == before


def save_resnet10t(path: Path) -> Path:
    torch.manual_seed(0)
    state = create_backbone("resnet10t").state_dict()
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


@pytest.mark.parametrize("suffix, reason", [
    (".pth", r"not a readable torch checkpoint \(truncated: \d+ bytes, the zip archive's end "
             r"record is missing\): PytorchStreamReader failed reading zip archive"),
    (".safetensors", r"not a readable safetensors file \(truncated: (\d+) of the (\d+) bytes "
                     r"its header declares\)"),
])
def test_truncated_checkpoint_names_the_file_and_the_fix(tmp_path: Path, suffix: str,
                                                          reason: str) -> None:
    path = save_resnet10t(tmp_path / f"teacher{suffix}")
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    done = run("teacher", "--checkpoint", str(path), "--arch", "resnet10t", "--out",
               str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"teacher: {path}: ")
    found = re.search(reason, line)
    assert found, line
    if suffix == ".safetensors":
        assert (int(found.group(1)), int(found.group(2))) == (size // 2, size)
    assert line.endswith("Copy or download it again (compare its sha256 with the source's), or "
                         "pass another checkpoint")
    assert not (tmp_path / "out").exists()


def test_unknown_checkpoint_layout_through_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"weights": {"conv1.weight": torch.zeros(1)}, "step": 3}, path)
    done = run("teacher", "--checkpoint", str(path), "--arch", "resnet18", "--out",
               str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{path}: unrecognised checkpoint layout" in done.stderr, done.stderr
    assert "['weights', 'step']" in done.stderr
    assert not (tmp_path / "out").exists()


# --- disk full ----------------------------------------------------------------------------

def test_disk_full_keeps_the_previous_output(fmnist) -> None:
    root, params = fmnist
    assert run("fashion_mnist", *fmnist_args(root, params), cwd=root).returncode == 0
    before = tree(root / "data"), tree(root / "metrics")
    # a different subset, written under a 4 KB file-size limit: train.tsv (~20 KB) cannot fit
    params.write_text(params.read_text().replace("limit_train: 20", "limit_train: 30"))
    done = run("fashion_mnist", *fmnist_args(root, params), cwd=root, fsize=4096)
    error = error_line(done)
    out = root / "data" / "fashion_mnist"
    assert error.startswith(f"fashion_mnist: error: {out}: could not be written: File too large "
                            f"(errno EFBIG). The disk, a quota or the file-size limit (ulimit -f) "
                            f"is full: free space on {out.parent.resolve()} or raise the limit, "
                            f"then re-run. The previous fashion_mnist is untouched")
    assert (tree(root / "data"), tree(root / "metrics")) == before  # no temporaries either
    # the same command with room to write succeeds: the failure was the limit alone
    assert run("fashion_mnist", *fmnist_args(root, params), cwd=root).returncode == 0
    assert json.loads((root / "metrics" / "fashion_mnist.json").read_text())["train"][
        "samples"] == 30


def test_disk_full_in_a_stage_of_the_common_frame(tmp_path: Path) -> None:
    write_features(tmp_path / "features")
    params = tmp_path / "params.yaml"
    params.write_text("data: {holdout_fraction: 0.2}\nknn: {k: 5, sweep_k: [1, 5]}\n")
    metrics = tmp_path / "metrics" / "knn.json"
    metrics.parent.mkdir()
    metrics.write_text('{"previous": true}\n')
    done = run("knn", "--name", "student", "--features", str(tmp_path / "features"),
               "--metrics", str(metrics), "--params", str(params), cwd=tmp_path, fsize=200)
    error = error_line(done)
    assert error.startswith(f"knn@student: error: {metrics}: could not be written: File too large")
    assert tree(tmp_path / "metrics") == {"knn.json": b'{"previous": true}\n'}
