"""Model-vs-model comparisons on the same test images, from the kNN / linear stages' per-sample
predictions: the paired tests of the report (teacher, SEED student, baseline) and of the
`make reproduce` table (each seed's SEED student against the same seed's baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from seed_core.evaluation.predictions import load_predictions, paired_correctness
from seed_core.evaluation.stats import compare_paired
from seed_core.report.tables import PAIRS, PROTOCOLS


def compare_files(first: str | Path, second: str | Path) -> dict[str, Any]:
    """`PairedComparison.to_dict()` of the model behind `first` against the one behind `second`
    (accuracy difference first - second, McNemar, paired bootstrap; seeded, so reproducible)."""
    a, b = paired_correctness(load_predictions(first), load_predictions(second),
                              f"{first} vs {second}")
    return compare_paired(a.numpy(), b.numpy()).to_dict()


def paired_tests(paths: Mapping[str, Mapping[str, str | Path]]) -> dict[str, dict[str, Any]]:
    """`{protocol: {pair: comparison}}` for the pairs of `PAIRS` from
    `paths[protocol][model]` (prediction files); protocols without files are left out."""
    out: dict[str, dict[str, Any]] = {}
    for protocol in PROTOCOLS:
        files = paths.get(protocol, {})
        if not files:
            continue
        out[protocol] = {pair: compare_files(files[first], files[second])
                         for pair, (first, second) in PAIRS.items()}
    return out


def paired_metrics(paired: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, float]:
    """Flat numbers for MLflow: `paired.knn.student_vs_baseline.p_value`, `.difference`,
    `.ci_low`, `.ci_high`."""
    return {f"paired.{protocol}.{pair}.{key}": float(c[key])
            for protocol, pairs in paired.items() for pair, c in pairs.items()
            for key in ("difference", "ci_low", "ci_high", "p_value")}


def seed_tests(seed_files: Sequence[str | Path], baseline_files: Sequence[str | Path],
               where: str) -> list[dict[str, Any]]:
    """Per seed: the SEED student of seed i against the baseline of seed i (same test images)."""
    if len(seed_files) != len(baseline_files):
        raise ValueError(f"{where}: {len(seed_files)} SEED prediction files but "
                         f"{len(baseline_files)} baseline ones; list one per seed in both")
    return [compare_files(s, b) for s, b in zip(seed_files, baseline_files)]
