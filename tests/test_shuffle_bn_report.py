"""`seed_core.report.shuffle_bn`: the baselines with and without shuffling BN, compared per
(student, seed) on the same test images and summarised over the pairs, against a naive count."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from seed_core.evaluation.predictions import save_predictions
from seed_core.report.shuffle_bn import BEGIN, END, main

ROOT = Path(__file__).resolve().parent.parent
STUDENTS, SEEDS, N = ["tiny_a", "tiny_b"], [0, 1], 400


def params_file(root: Path, students: list[str], seeds: list[int]) -> Path:
    """The project's params.yaml with another `reproduce` section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["reproduce"] = {"students": students, "seeds": seeds}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def write_runs(root: Path, accuracy: dict[tuple[str, int], float], seed: int) -> Path:
    """Baseline prediction files whose correct fraction is `accuracy[(arch, seed)]`."""
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 10, N))  # one test split
    rng = np.random.default_rng(seed)
    for (arch, run_seed), acc in accuracy.items():
        folder = root / arch / str(run_seed) / "baseline"
        folder.mkdir(parents=True)
        right = torch.from_numpy(rng.random(N) < acc)
        for protocol in ("knn", "linear"):
            save_predictions(folder / f"{protocol}.safetensors", torch.arange(N), labels,
                             torch.where(right, labels, (labels + 1) % 10))
            (folder / f"{protocol}.json").write_text(json.dumps({"holdout": {"top1": 50.0}}))
    return root


def test_pairs_are_compared_and_counted(tmp_path: Path) -> None:
    # one student clearly helped by shuffling BN, the other unchanged in distribution
    with_acc = {("tiny_a", 0): 0.8, ("tiny_a", 1): 0.82, ("tiny_b", 0): 0.5, ("tiny_b", 1): 0.5}
    without_acc = {("tiny_a", 0): 0.5, ("tiny_a", 1): 0.5, ("tiny_b", 0): 0.5,
                   ("tiny_b", 1): 0.5}
    with_runs = write_runs(tmp_path / "with", with_acc, seed=1)
    without_runs = write_runs(tmp_path / "without", without_acc, seed=2)
    params = params_file(tmp_path, STUDENTS, SEEDS)
    seed_top1 = {"tiny_a": [90.0, 91.0], "tiny_b": [70.0, 72.0]}
    reproduce = tmp_path / "reproduce.json"
    reproduce.write_text(json.dumps({"students": {
        arch: {"seed": {"knn_top1": top1, "linear_top1": top1}} for arch, top1 in
        seed_top1.items()}}))
    doc = tmp_path / "page.md"
    doc.write_text(f"before\n{BEGIN}\n{END}\nafter\n")
    out = tmp_path / "shuffle_bn.json"
    assert main(["--with", str(with_runs), "--without", str(without_runs), "--params",
                 str(params), "--reproduce", str(reproduce), "--out", str(out), "--doc",
                 str(doc), "--commit", "abc1234"]) == 0
    result = json.loads(out.read_text())
    assert result["test_images"] == N and result["shuffle_bn_group"] == 32
    rows = result["pairs"]["tiny_a"]["knn"]
    assert [row["seed"] for row in rows] == SEEDS
    for row in rows:
        assert row["difference"] == pytest.approx(row["with"] - row["without"], abs=0.011)
        assert row["significant"] and row["p_value"] < 1e-6  # 30 points on 400 images
    summary = result["summary"]["linear"]
    differences = [row["difference"] for arch in STUDENTS
                   for row in result["pairs"][arch]["linear"]]
    assert summary["pairs"] == 4
    assert summary["mean_difference"] == pytest.approx(np.mean(differences), abs=0.01)
    half = 3.182 * np.std(differences, ddof=1) / math.sqrt(4)
    assert summary["interval"] == pytest.approx([np.mean(differences) - half,
                                                 np.mean(differences) + half], abs=0.01)
    significant = [row for arch in STUDENTS for row in result["pairs"][arch]["linear"]
                   if row["p_value"] < 0.05]
    assert summary["better"] == sum(row["difference"] > 0 for row in significant) >= 2
    assert summary["better"] + summary["worse"] + summary["not_significant"] == 4
    with_tops = [row["with"] for arch in STUDENTS for row in result["pairs"][arch]["linear"]]
    seeds_flat = [v for arch in STUDENTS for v in seed_top1[arch]]
    assert summary["seed_gain_over_with"] == pytest.approx(
        np.mean(np.subtract(seeds_flat, with_tops)), abs=0.01)
    assert summary["seed_gain_over_without"] > summary["seed_gain_over_with"]
    page = doc.read_text()
    assert page.startswith("before\n") and page.endswith(f"{END}\nafter\n")
    assert "| tiny_a | kNN |" in page and "abc1234" in page
    assert main(["--out", str(out), "--doc", str(doc), "--check"]) == 0
    doc.write_text(page.replace("| tiny_a | kNN |", "| tiny_a | knn |"))
    assert main(["--out", str(out), "--doc", str(doc), "--check"]) == 1


def test_a_missing_run_names_the_file_and_what_to_run(tmp_path: Path) -> None:
    with_runs = write_runs(tmp_path / "with", {("tiny_a", 0): 0.5}, seed=1)
    params = params_file(tmp_path, ["tiny_a"], [0])
    with pytest.raises(FileNotFoundError, match=r"without/tiny_a/0/baseline/knn.safetensors "
                                                r"is missing: run `cd reproduce && dvc repro`"):
        main(["--with", str(with_runs), "--without", str(tmp_path / "without"), "--params",
              str(params), "--out", str(tmp_path / "out.json")])


def test_the_committed_section_is_current() -> None:
    """docs/methodology.md's shuffle-BN section is rendered from metrics/shuffle_bn.json."""
    committed = ROOT / "metrics" / "shuffle_bn.json"
    if not committed.exists():
        pytest.fail("metrics/shuffle_bn.json is missing: it holds the committed measurement")
    assert main(["--out", str(committed), "--doc", str(ROOT / "docs" / "methodology.md"),
                 "--check"]) == 0
