"""Training throughput of this checkout against an earlier commit, same machine, one sitting.

The earlier commit (default: c7ab809, the pipeline before the performance work) is checked out
in a temporary git worktree. Each version then runs its own stages on the same data, with MLflow
off, alternating A, B, A, B for `--rounds` rounds so that a drift of the machine hits both:
`stages/shards.py` cuts the same SEED TSV into shards, `stages/pretrain.py` trains the teacher
(timed), `stages/teacher.py` normalises it, `stages/distill.py` distils the student (timed), both
under `torchrun --nproc_per_node 1` as `dvc repro` runs them. Both versions use the earlier
commit's default teacher and student (the "today's default models" of the comparison) and
`--epochs` epochs; every other knob is each version's own default. Prints one JSON object:
per version and stage the median images/s (each stage's own `images_per_s`), stage seconds,
final loss and data-wait fraction, and `speedup = this checkout / earlier commit`.
Goal: >= 1.3 for pretrain and distill.

    python bench/bench_versions.py [--baseline c7ab809] [--epochs 2] [--rounds 2]
        [--tsv data/fashion_mnist/train.tsv]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "distill")
GOAL = 1.3


def run(cmd: list[str], cwd: Path, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(cwd), "SEED_TRACKING": "0"}
    with log.open("a") as out:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"bench_versions: {' '.join(cmd)} failed in {cwd} (exit {done.returncode}); "
                 f"see {log}")


def torchrun(script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "1", f"stages/{script}", *args]


def version_params(root: Path, models: dict[str, str], epochs: int, out: Path) -> Path:
    """The version's own params.yaml with the compared models and the epochs set."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["teacher"]["arch"] = models["teacher"]
    params["student"]["arch"] = models["student"]
    params["pretrain"]["teacher_epochs"] = epochs
    params["pretrain"]["epochs"] = epochs
    params["distill"]["epochs"] = epochs
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return out


def prepare(root: Path, work: Path, tsv: Path, log: Path) -> Path:
    """The version's shards of the TSV, made by its own converter."""
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        run([sys.executable, "stages/shards.py", "--tsv", str(tsv), "--out", str(shards),
             "--workers", "1"], root, log)
    return shards


def one_round(root: Path, work: Path, shards: Path, params: Path, models: dict[str, str],
              log: Path) -> dict[str, dict[str, Any]]:
    """Pretrain the teacher, normalise it, distil the student; the two training stages' metrics."""
    for path in ("pretrain", "teacher", "distill", "checkpoints"):
        subprocess.run(["rm", "-rf", str(work / path)], check=True)
    run(torchrun("pretrain.py", "--target", "teacher", "--shards", str(shards), "--out",
                 str(work / "pretrain"), "--curves", str(work / "pretrain.csv"), "--metrics",
                 str(work / "pretrain.json"), "--params", str(params), "--checkpoint-dir",
                 str(work / "checkpoints" / "pretrain")), root, log)
    run([sys.executable, "stages/teacher.py", "--checkpoint",
         str(work / "pretrain" / "model.safetensors"), "--arch", models["teacher"], "--out",
         str(work / "teacher"), "--params", str(params)], root, log)
    run(torchrun("distill.py", "--teacher", str(work / "teacher"), "--shards", str(shards),
                 "--out", str(work / "distill"), "--curves", str(work / "distill.csv"),
                 "--metrics", str(work / "distill.json"), "--params", str(params),
                 "--checkpoint-dir", str(work / "checkpoints" / "distill"),
                 "--no-mlflow-model"), root, log)
    return {stage: json.loads((work / f"{stage}.json").read_text()) for stage in STAGES}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"images_per_s": median("images_per_s"), "seconds": median("seconds"),
            "final_loss": median("final_loss"), "data_wait_fraction": median("data_wait_fraction"),
            "images_per_s_runs": [r.get("images_per_s") for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="c7ab809", help="the earlier commit")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tsv", default=str(ROOT / "data" / "fashion_mnist" / "train.tsv"),
                        help="SEED TSV to train on (make demo writes the default one)")
    args = parser.parse_args()
    tsv = Path(args.tsv).resolve()
    if not tsv.exists():
        print(json.dumps({"benchmark": "versions",
                          "skipped": f"needs {tsv}: run make demo first (or pass --tsv)"}))
        return
    with tempfile.TemporaryDirectory(prefix="bench_versions_") as tmp:
        tmp_path = Path(tmp)
        old_root = tmp_path / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                        str(old_root), args.baseline], check=True)
        try:
            result = compare(args, tsv, tmp_path, {"baseline": old_root, "current": ROOT})
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(old_root)], check=False)
    print(json.dumps(result, indent=2))


def compare(args: argparse.Namespace, tsv: Path, tmp: Path,
            roots: dict[str, Path]) -> dict[str, Any]:
    old_params = yaml.safe_load((roots["baseline"] / "params.yaml").read_text())
    models = {"teacher": old_params["teacher"]["arch"], "student": old_params["student"]["arch"]}
    log = tmp / "log.txt"
    works = {name: tmp / f"work_{name}" for name in roots}
    shards, params = {}, {}
    for name, root in roots.items():
        works[name].mkdir()
        shards[name] = prepare(root, works[name], tsv, log)
        params[name] = version_params(root, models, args.epochs, works[name] / "params.yaml")
    runs: dict[str, dict[str, list]] = {name: {s: [] for s in STAGES} for name in roots}
    load, start = os.getloadavg(), time.time()
    for _ in range(args.rounds):
        for name, root in roots.items():
            metrics = one_round(root, works[name], shards[name], params[name], models, log)
            for stage in STAGES:
                runs[name][stage].append(metrics[stage])
    summary = {name: {s: summarise(runs[name][s]) for s in STAGES} for name in roots}
    speedup = {s: summary["current"][s]["images_per_s"] / summary["baseline"][s]["images_per_s"]
               for s in STAGES}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    return {"benchmark": "versions", "baseline_commit": args.baseline, "current_commit": head,
            "models": models, "epochs": args.epochs, "rounds": args.rounds,
            "cpus": os.cpu_count(), "load_average_at_start": list(load),
            "seconds": round(time.time() - start, 1), "versions": summary,
            "speedup": speedup, "goal_min": GOAL,
            "goal_met": {s: speedup[s] >= GOAL for s in STAGES}}


if __name__ == "__main__":
    main()
