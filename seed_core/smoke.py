"""`make smoke`: the whole DAG on tiny settings, in a scratch copy of the repository.

    python -m seed_core.smoke [--dir DIR] [--keep]

It copies what the pipeline needs (`PIPELINE_FILES`) into a scratch git repository, shrinks the
params (`TINY`: 400 training images of 16 px, one epoch of each training, a 5-epoch probe) and runs
`dvc repro` there, so the committed results, `dvc.lock` and `mlflow.db` are not touched. It
prints the report and the wall time, and removes the copy unless `--keep`. The end-to-end tests
(`tests/test_pipeline.py`) start from the same copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FILES = ["stages", "seed_core", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore",
                  ".gitignore"]
TINY = {
    "data": {"limit_train": 400, "limit_val": 200, "image_size": 16, "shard_size": 100,
             "workers": 0},
    # a 1-epoch teacher checked on 200 images may not pass the gate (tests/test_teacher_stage.py
    # shows the gate passing and failing); the numbers are still recorded
    "teacher": {"verify_samples": 200, "verify_gate": False},
    "pretrain": {"epochs": 1, "teacher_epochs": 1, "batch_size": 64, "queue_size": 128},
    "distill": {"epochs": 1, "batch_size": 64, "queue_size": 128, "checkpoint_every": 2},
    "features": {"batch_size": 200},
    "knn": {"sweep_k": [5, 10]},
    "linear": {"epochs": 5, "lrs": [0.1, 1.0]},
}
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "seed-smoke", "GIT_AUTHOR_EMAIL": "smoke@localhost",
                "GIT_COMMITTER_NAME": "seed-smoke", "GIT_COMMITTER_EMAIL": "smoke@localhost"}


def tiny_params(params: dict) -> dict:
    """`params` with every section's `TINY` values put in."""
    return {section: {**values, **TINY.get(section, {})} for section, values in params.items()}


def scratch_copy(target: Path, source: Path = ROOT) -> Path:
    """A git repository at `target` holding `source`'s pipeline with tiny params, committed
    (DVC experiments branch from a commit)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in PIPELINE_FILES:
        origin, copy = source / item, target / item
        copy.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, copy, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, copy)
    params = yaml.safe_load((source / "params.yaml").read_text())
    (target / "params.yaml").write_text(yaml.safe_dump(tiny_params(params), sort_keys=False))
    env = {**os.environ, **GIT_IDENTITY}
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "scratch copy"]):
        subprocess.run(command, cwd=target, env=env, check=True)
    return target


def pipeline_env(repo: Path) -> dict[str, str]:
    """The environment `dvc repro` runs a scratch copy in: the copy's own stages and tracking
    store (mlflow.db in the copy), whatever the shell says."""
    env = {**os.environ, "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seed_core.smoke",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to make the copy (default: a new temp directory)")
    parser.add_argument("--keep", action="store_true", help="keep the copy afterwards")
    args = parser.parse_args(argv)
    where = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="seed-smoke-"))
    started = time.perf_counter()
    repo = scratch_copy(where / "repo")
    print(f"seed_core.smoke: tiny pipeline in {repo}", flush=True)
    done = subprocess.run(["dvc", "repro"], cwd=repo, env=pipeline_env(repo))
    seconds = time.perf_counter() - started
    if done.returncode == 0:
        print((repo / "reports" / "summary.md").read_text().split("\n\n")[1])
    print(f"seed_core.smoke: {'passed' if done.returncode == 0 else 'FAILED'} in {seconds:.0f} s"
          f"{f'; the copy is in {repo}' if args.keep or done.returncode else ''}", flush=True)
    if not args.keep and done.returncode == 0:
        shutil.rmtree(where if not args.dir else repo)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
