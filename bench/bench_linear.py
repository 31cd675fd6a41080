"""Linear evaluation: cached-feature mode against the augmented MoCo protocol; prints JSON.

Runs the real `stages/linear.py` twice in subprocesses on the same model, features and shards,
once with `linear.mode: cached` and once with `augmented` (each from a params file of its own:
the given params with `linear.mode` set and any `--set` overrides), with MLflow tracking off.
Reports each run's own seconds (the stage's metrics JSON) and wall seconds (process start
included), `speedup = augmented / cached` (stage seconds) and the test top-1 of both.
Goals: speedup >= 20 and |top-1 difference| <= 1.5 points.

    python bench/bench_linear.py --features data/features/student --model models/student \
        --train-shards data/shards/train --val-shards data/shards/val [--name student]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODES = ("cached", "augmented")
GOALS = {"speedup_min": 20.0, "top1_gap_max": 1.5}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", required=True,
                        help="directory written by stages/features.py for the model")
    parser.add_argument("--model", required=True, help="canonical model (dir or .safetensors)")
    parser.add_argument("--train-shards", required=True)
    parser.add_argument("--val-shards", required=True)
    parser.add_argument("--name", default="student", help="model name passed to the stage")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"),
                        help="params file the two runs start from")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML",
                        help="override a param in both runs, e.g. --set linear.epochs=10")
    parser.add_argument("--workdir", default=None,
                        help="where params and metrics of the two runs go (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=6 * 3600,
                        help="seconds allowed per run")
    return parser.parse_args(argv)


def params_for(base: dict[str, Any], mode: str, overrides: list[str]) -> dict[str, Any]:
    """`base` with `linear.mode = mode` and each `section.key=value` (value read as YAML)."""
    params = json.loads(json.dumps(base))  # deep copy of plain YAML data
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section and name):
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. "
                             "linear.epochs=10")
        if section == "linear" and name == "mode":
            raise SystemExit("--set linear.mode: the benchmark runs both modes itself")
        params.setdefault(section, {})[name] = yaml.safe_load(value)
    params.setdefault("linear", {})["mode"] = mode
    return params


def run_mode(args: argparse.Namespace, workdir: Path, mode: str,
             base: dict[str, Any]) -> dict[str, Any]:
    params_path = workdir / f"params_{mode}.yaml"
    params_path.write_text(yaml.safe_dump(params_for(base, mode, args.set), sort_keys=False))
    metrics_path = workdir / f"linear_{mode}.json"
    command = [sys.executable, str(ROOT / "stages" / "linear.py"), "--name", args.name,
               "--features", args.features, "--model", args.model,
               "--train-shards", args.train_shards, "--val-shards", args.val_shards,
               "--metrics", str(metrics_path), "--params", str(params_path)]
    env = {**os.environ, "SEED_TRACKING": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"stages/linear.py in {mode} mode failed (exit {done.returncode}); "
                         f"its last output:\n{done.stderr[-3000:]}")
    metrics = json.loads(metrics_path.read_text())
    out = {"stage_seconds": metrics["seconds"], "wall_seconds": round(wall, 3),
           "test_top1": metrics["test"]["top1"], "test_top5": metrics["test"]["top5"],
           "lr": metrics["lr"], "epochs": metrics["epochs"]}
    if args.workdir:  # kept: say where
        out["metrics"] = str(metrics_path)
    return out


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    cached, augmented = runs["cached"], runs["augmented"]
    speedup = augmented["stage_seconds"] / max(cached["stage_seconds"], 1e-9)
    gap = cached["test_top1"] - augmented["test_top1"]
    return {"speedup": round(speedup, 2),
            "speedup_wall": round(augmented["wall_seconds"] / max(cached["wall_seconds"], 1e-9),
                                  2),
            "top1_cached_minus_augmented": round(gap, 2),
            "goals": GOALS,
            "speedup_goal_met": speedup >= GOALS["speedup_min"],
            "top1_goal_met": abs(gap) <= GOALS["top1_gap_max"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base = yaml.safe_load(Path(args.params).read_text()) or {}
    with tempfile.TemporaryDirectory(prefix="bench_linear_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runs = {mode: run_mode(args, workdir, mode, base) for mode in MODES}
    print(json.dumps({"benchmark": "linear", "name": args.name, "features": args.features,
                      "overrides": args.set, "runs": runs, **compare(runs)}, indent=2))


if __name__ == "__main__":
    main()
