"""The results tables: the SEED paper's layout (teacher, baseline ✗, SEED) and the holdout
table, built from the evaluation metrics (pure functions)."""

from __future__ import annotations

import math
from typing import Any, Mapping

MODELS = ("teacher", "baseline", "student")
ROW_NAMES = {"teacher": "Teacher", "baseline": "Baseline (no distillation)", "student": "SEED"}
SUMMARY_KEYS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")
LOG_COLUMNS = ("step", "epoch", "loss", "lr")
METHOD_NAMES = {"moco_v1": "MoCo", "moco_v2": "MoCo-v2", "moco_v3": "MoCo-v3", "swav": "SwAV",
                "simclr": "SimCLR", "dino": "DINO", "barlow_twins": "Barlow Twins",
                "solo_learn": "solo-learn", "vissl": "VISSL", "seed": "SEED",
                "torchvision": "supervised (torchvision)"}



def build_summary(knn: Mapping[str, Mapping[str, Any]],
                  linear: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """`{"teacher": {"knn_top1", "knn_top5", "linear_top1", "linear_top5"}, "baseline": ..,
    "student": ..}` from the test numbers of the kNN and linear metrics (percent)."""
    summary: dict[str, dict[str, float]] = {}
    for model in MODELS:
        row = {}
        for kind, metrics in (("knn", knn), ("linear", linear)):
            try:
                test = metrics[model]["test"]
                row[f"{kind}_top1"] = float(test["top1"])
                row[f"{kind}_top5"] = float(test["top5"])
            except KeyError as err:
                raise ValueError(f"{kind} metrics of '{model}' lack test {err}") from None
        summary[model] = row
    return summary


def summary_metrics(summary: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """`{"student.knn_top1": ..}` for the pipeline's parent MLflow run."""
    return {f"{model}.{key}": value for model, row in summary.items()
            for key, value in row.items()}


def method_label(meta: Mapping[str, Any]) -> str:
    """SSL method of a model: from `method` (trained here) or the source checkpoint format."""
    method = meta.get("method")
    if method:
        return METHOD_NAMES.get(method, str(method))
    fmt = meta.get("format")
    if fmt and fmt != "seed_distill":
        return f"{METHOD_NAMES.get(fmt, fmt)} (external checkpoint)"
    return "unknown"


def arch_label(meta: Mapping[str, Any]) -> str:
    arch = meta.get("arch", "unknown")
    return f"{arch} (small-image stem)" if meta.get("small_images") else str(arch)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_table(summary: Mapping[str, Mapping[str, float]],
                  metas: Mapping[str, Mapping[str, Any]]) -> str:
    """The SEED paper's layout: teacher, baseline (✗ no distillation) and SEED rows."""
    lines = ["| Model | Architecture | SSL method | Distilled | Epochs | kNN top-1 | kNN top-5 "
             "| Linear top-1 | Linear top-5 |",
             "|---|---|---|:-:|--:|--:|--:|--:|--:|"]
    for model in MODELS:
        meta, row = metas.get(model, {}), summary[model]
        if model == "teacher":
            distilled = "–"
        elif model == "baseline":
            distilled = "✗"
        else:
            teacher_arch = meta.get("teacher_arch") or metas.get("teacher", {}).get("arch", "?")
            distilled = f"✓ from {teacher_arch}"
        epochs = meta.get("epochs") or ("external" if model == "teacher" else "–")
        lines.append(f"| {ROW_NAMES[model]} | {arch_label(meta)} | {method_label(meta)} | "
                     f"{distilled} | {epochs} | " + " | ".join(_fmt(row[k]) for k in SUMMARY_KEYS)
                     + " |")
    return "\n".join(lines)


def lr_label(metrics: Mapping[str, Any]) -> str:
    lr = metrics.get("lr")
    return f"{lr:g}" if isinstance(lr, (int, float)) else "–"


def best_sweep(sweep: Mapping[str, float]) -> str:
    if not sweep:
        return "–"
    k, top1 = max(sweep.items(), key=lambda kv: (kv[1], -int(kv[0])))
    return f"k={k} ({top1:.2f})"


def holdout_table(knn: Mapping[str, Mapping[str, Any]],
                  linear: Mapping[str, Mapping[str, Any]]) -> str:
    lines = ["| Model | kNN top-1 | kNN top-5 | best k of the sweep (top-1) | linear lr | "
             "linear top-1 | linear top-5 |", "|---|--:|--:|--:|--:|--:|--:|"]
    for model in MODELS:
        kh, lh = knn[model].get("holdout", {}), linear[model].get("holdout", {})
        lines.append(f"| {ROW_NAMES[model]} | {_fmt(kh.get('top1'))} | {_fmt(kh.get('top5'))} | "
                     f"{best_sweep(kh.get('sweep_top1', {}))} | {lr_label(linear[model])} | "
                     f"{_fmt(lh.get('top1'))} | {_fmt(lh.get('top5'))} |")
    return "\n".join(lines)


