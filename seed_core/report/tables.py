"""The results tables: the SEED paper's layout (teacher, baseline ✗, SEED) and the holdout
table, built from the evaluation metrics (pure functions)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from seed_core.evaluation.splits import grid_edge
from seed_core.evaluation.stats import ALPHA, mean_interval, seed_spread

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


# the training stages' metrics files, by the model they trained
TRAINING_FILES = {"teacher": "pretrain_teacher.json", "baseline": "pretrain_baseline.json",
                  "student": "distill.json"}


# `metrics/headline/<row>.json`: the files `dvc metrics show` lists, one table row each
HEADLINE_DIR = "headline"
GAIN_ROW = "seed_minus_baseline"


def headline_rows(knn: Mapping[str, Mapping[str, Any]], linear: Mapping[str, Mapping[str, Any]],
                  paired: Mapping[str, Mapping[str, Mapping[str, Any]]],
                  seconds: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """The scalars that runs are compared by, one row per file of `metrics/headline/`.
    Per model (teacher, baseline, student): `knn` and `linear`, test-split top-1;
    `knn_holdout` and `linear_holdout`, the holdout top-1 that chose its kNN (k, T) and linear
    lr, and so what ranks runs; `train_s`, its training seconds. `seed_minus_baseline`: `knn`
    and `linear`, SEED − baseline in points on the test split, and `knn_p`, `linear_p`,
    McNemar's p as text (`2.6e-263`, `< 1e-300`), since `dvc metrics show` prints numbers to 5
    decimals and would print 0.0. The rows share column names, so the table DVC prints is 7
    columns wide (one file per row, the union of keys as columns). Rounded to what they
    resolve: accuracies and differences to 0.01 points, seconds to 0.1 s."""
    rows: dict[str, dict[str, Any]] = {}
    for model in MODELS:
        row: dict[str, Any] = {}
        for kind, metrics in (("knn", knn), ("linear", linear)):
            row[kind] = round(float(metrics[model]["test"]["top1"]), 2)
            row[f"{kind}_holdout"] = round(float(metrics[model]["holdout"]["top1"]), 2)
        if TRAINING_FILES[model] in seconds:
            row["train_s"] = round(float(seconds[TRAINING_FILES[model]]), 1)
        rows[model] = row
    gain: dict[str, Any] = {}
    for protocol, pairs in paired.items():
        if "student_vs_baseline" in pairs:
            test = pairs["student_vs_baseline"]
            gain[protocol] = round(float(test["difference"]), 2)
            gain[f"{protocol}_p"] = p_label(float(test["p_value"]))
    rows[GAIN_ROW] = gain
    return rows


def p_of_label(label: str | float) -> float:
    """`p_label`'s text back as a number (`< 1e-300` as 0.0, which `p_label` prints the same)."""
    if isinstance(label, (int, float)):
        return float(label)
    return 0.0 if label.strip().startswith("<") else float(label)


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


def lr_edge(metrics: Mapping[str, Any]) -> str | None:
    """Where the chosen lr sits in `linear.lrs` (see `grid_edge`): as recorded by the linear
    stage, or from the grid of holdout scores in metrics written before it recorded that."""
    hold, lr = metrics.get("holdout", {}), metrics.get("lr")
    if "lr_edge" in hold:
        return hold["lr_edge"]
    if not isinstance(lr, (int, float)) or not hold.get("lr_top1"):
        return None
    return grid_edge(float(lr), [float(v) for v in hold["lr_top1"]])


def lr_label(metrics: Mapping[str, Any]) -> str:
    """The linear probe's lr, with its place in `linear.lrs` when it is an end of the grid."""
    lr = metrics.get("lr")
    if not isinstance(lr, (int, float)):
        return "–"
    edge = lr_edge(metrics)
    return f"{lr:g} ({edge} of the grid)" if edge else f"{lr:g}"


def knn_label(metrics: Mapping[str, Any]) -> str:
    """`k=10, T=0.07`, with the end of its grid when the chosen k or T sits there."""
    k, t = metrics.get("k"), metrics.get("temperature")
    if k is None or t is None:
        return "–"
    hold = metrics.get("holdout", {})
    edges = [f"{what} {hold[key]} of its grid" for what, key in (("k", "k_edge"),
                                                                  ("T", "temperature_edge"))
             if hold.get(key)]
    best, p_value = hold.get("best"), hold.get("best_p_value")
    if best and p_value is not None and best != f"k{k}_T{t:g}":
        best_k, best_t = best[1:].split("_T")
        edges.append(f"the holdout's best, k={best_k}, T={best_t}, was not significantly "
                     f"better: p = {p_value:.2g}")
    return f"k={k}, T={t:g}" + (f" ({'; '.join(edges)})" if edges else "")


def knn_selected(metrics: Mapping[str, Any]) -> bool:
    """Whether this kNN metrics file says its (k, T) was chosen on the holdout split."""
    return metrics.get("selected_on") == "holdout"


def configured_knn_top1(metrics: Mapping[str, Any]) -> float | None:
    """Holdout top-1 of the configured (knn.k, knn.temperature), when the grid recorded it."""
    conf = metrics.get("configured") or {}
    grid = metrics.get("holdout", {}).get("grid_top1", {})
    if "k" not in conf or "temperature" not in conf:
        return None
    return grid.get(f"k{conf['k']}_T{conf['temperature']:g}")


def holdout_table(knn: Mapping[str, Mapping[str, Any]],
                  linear: Mapping[str, Mapping[str, Any]]) -> str:
    """Per model: the values chosen on the holdout split and their holdout accuracy."""
    lines = ["| Model | kNN k, T chosen | kNN top-1 | configured k, T: top-1 | linear lr chosen | "
             "linear top-1 | linear top-5 |", "|---|--:|--:|--:|--:|--:|--:|"]
    for model in MODELS:
        km, lm = knn[model], linear[model]
        kh, lh = km.get("holdout", {}), lm.get("holdout", {})
        conf = km.get("configured") or {}
        configured = (f"k={conf['k']}, T={conf['temperature']:g}: "
                      f"{_fmt(configured_knn_top1(km))}" if conf else "–")
        chosen = knn_label(km) if knn_selected(km) else f"{knn_label(km)} (not tuned)"
        lines.append(f"| {ROW_NAMES[model]} | {chosen} | {_fmt(kh.get('top1'))} | {configured} | "
                     f"{lr_label(lm)} | {_fmt(lh.get('top1'))} | {_fmt(lh.get('top5'))} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- paired tests

PROTOCOLS = {"knn": "kNN", "linear": "linear"}
# the three model pairs of the paper's claim, the better-expected model first
PAIRS = {"teacher_vs_student": ("teacher", "student"),
         "student_vs_baseline": ("student", "baseline"),
         "teacher_vs_baseline": ("teacher", "baseline")}
PAIR_NAMES = {"teacher_vs_student": "teacher − SEED", "student_vs_baseline": "SEED − baseline",
              "teacher_vs_baseline": "teacher − baseline"}


def p_label(p: float) -> str:
    """A p-value as a reader wants it: 3 significant digits, 2 in scientific notation below 1e-3,
    and `< 1e-300` for what the float range cannot hold (an underflow to 0 is not p = 0)."""
    if p < 1e-300:
        return "< 1e-300"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3g}"


def signed(value: float, digits: int = 2) -> str:
    return f"{value:+.{digits}f}"


def paired_table(paired: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """`paired[protocol][pair]` (`PairedComparison.to_dict()`) as one row per comparison."""
    lines = ["| Protocol | Comparison | Difference (points) | 95% CI (paired bootstrap) | "
             "Images only the first / only the second got right | McNemar p | "
             f"Significant (p < {ALPHA:g}) |",
             "|---|---|--:|--:|--:|--:|:-:|"]
    for protocol, label in PROTOCOLS.items():
        for pair, name in PAIR_NAMES.items():
            c = paired.get(protocol, {}).get(pair)
            if not c:
                continue
            level = round(100 * c.get("confidence", 0.95))
            ci = f"[{signed(c['ci_low'])}, {signed(c['ci_high'])}]"
            lines.append(f"| {label} | {name} | {signed(c['difference'])} | {ci}"
                         f"{'' if level == 95 else f' ({level}%)'} | {c['a_only']} / "
                         f"{c['b_only']} | {p_label(c['p_value'])} | "
                         f"{'yes' if c['p_value'] < ALPHA else 'no'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- several seeds

METRICS = {"knn_top1": "kNN", "linear_top1": "linear"}


def spread_label(values: Sequence[float]) -> str:
    """`79.12 ± 0.31` (sample std over seeds), or the single value."""
    spread = seed_spread(values)
    return (f"{spread.mean:.2f}" if spread.std is None
            else f"{spread.mean:.2f} ± {spread.std:.2f}")


def per_seed_label(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def seed_test_label(tests: Sequence[Mapping[str, Any]] | None) -> str:
    """Per-seed McNemar tests of SEED against its baseline, counted both ways: `2 better, 1 worse
    (p 0.039), 0 not significant, of 3 seeds`. A significantly worse seed is never folded into
    the others."""
    if not tests:
        return "–"
    better = [t for t in tests if t["p_value"] < ALPHA and t["difference"] > 0]
    worse = [t for t in tests if t["p_value"] < ALPHA and t["difference"] < 0]
    unclear = len(tests) - len(better) - len(worse)
    worst = f" (max p {p_label(max(t['p_value'] for t in better))})" if better else ""
    reversed_ = (f" (p {', '.join(p_label(t['p_value']) for t in worse)})" if worse else "")
    return (f"{len(better)} better{worst}, {len(worse)} worse{reversed_}, {unclear} not "
            f"significant, of {len(tests)} seeds")


# the smallest teacher-over-baseline gap whose share `seeds_table` reports
MIN_GAP_POINTS = 1.0


def gap_recovery(seed_values: Sequence[float], baseline_values: Sequence[float],
                 teacher: float) -> list[float]:
    """Per seed, the share of that seed's baseline-to-teacher gap its SEED student closes."""
    return [(s - b) / (teacher - b) for s, b in zip(seed_values, baseline_values)]


def recovery_label(seed_values: Sequence[float], baseline_values: Sequence[float],
                   teacher: float) -> str:
    """`70% [58, 82]`: the mean per-seed gap recovery and its 95% t-interval over seeds."""
    mean, low, high = mean_interval(gap_recovery(seed_values, baseline_values, teacher))
    return f"{100 * mean:.0f}%" + ("" if low is None else f" [{100 * low:.0f}, {100 * high:.0f}]")


def seeds_table(reproduce: Mapping[str, Any]) -> str:
    """The `make reproduce` student table (`metrics/reproduce.json`, checked by
    `readers.check_reproduce`).

    Per student and metric: per-seed values and mean ± std of SEED and of its MoCo-v2 baseline,
    the mean gain, the share of the baseline-to-teacher gap it recovers, and the per-seed paired
    tests `students[arch]["paired"][metric]` when present.
    """
    teacher = reproduce.get("teacher", {})
    lines = ["| Student | Metric | SEED per seed | SEED mean ± std | Baseline per seed | "
             "Baseline mean ± std | Gain (points) | Gap recovered [95% CI over seeds] | "
             "Paired tests (SEED vs baseline, per seed) |",
             "|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for arch, runs in reproduce.get("students", {}).items():
        for metric, label in METRICS.items():
            seed_v, base_v = runs["seed"][metric], runs["baseline"][metric]
            gain = seed_spread(seed_v).mean - seed_spread(base_v).mean
            t = teacher.get(metric)
            gap = (t - seed_spread(base_v).mean) if isinstance(t, (int, float)) else None
            # a share of a gap under a point is noise over noise (938% was printed once)
            recovered = (recovery_label(seed_v, base_v, t)
                         if gap is not None and gap >= MIN_GAP_POINTS
                         else f"– (teacher − baseline {signed(gap)})" if gap is not None
                         else "–")
            lines.append(f"| {arch} | {label} | {per_seed_label(seed_v)} | {spread_label(seed_v)} "
                         f"| {per_seed_label(base_v)} | {spread_label(base_v)} | {signed(gain)} | "
                         f"{recovered} | {seed_test_label(runs.get('paired', {}).get(metric))} |")
    return "\n".join(lines)


