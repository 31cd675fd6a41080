"""The final report: summary numbers, a SEED-paper-style table, an honest reading, and plots.

The builders (`build_summary`, `results_table`, `reading_paragraph`, `pca_2d`, ...) are pure; the
readers at the top load the evaluation artefacts the stages wrote, and the `plot_*` functions
render PNGs offline (matplotlib, Agg backend).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from seed_core.evaluation import check_feature_tensors
from seed_core.io import atomic_path, read_json

log = logging.getLogger(__name__)

MODELS = ("teacher", "baseline", "student")
ROW_NAMES = {"teacher": "Teacher", "baseline": "Baseline (no distillation)", "student": "SEED"}
SUMMARY_KEYS = ("knn_top1", "knn_top5", "linear_top1", "linear_top5")
LOG_COLUMNS = ("step", "epoch", "loss", "lr")
METHOD_NAMES = {"moco_v1": "MoCo", "moco_v2": "MoCo-v2", "moco_v3": "MoCo-v3", "swav": "SwAV",
                "simclr": "SimCLR", "dino": "DINO", "barlow_twins": "Barlow Twins",
                "solo_learn": "solo-learn", "vissl": "VISSL", "seed": "SEED",
                "torchvision": "supervised (torchvision)"}


# ----------------------------------------------------------------------------- readers


def load_feature_split(features_dir: str | Path, split: str) -> dict[str, torch.Tensor]:
    """`features_dir/{split}.safetensors` as written by stages/features.py, checked."""
    from safetensors.torch import load_file

    path = Path(features_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no cached features; run stages/features.py first")
    tensors = load_file(str(path))
    check_feature_tensors(tensors, str(path))
    return tensors


def feature_num_classes(features_dir: str | Path, *labels: torch.Tensor) -> int:
    """The class count recorded in `features_dir/meta.json`, else 1 + the largest label."""
    meta_path = Path(features_dir) / "meta.json"
    known = read_json(meta_path).get("num_classes") if meta_path.is_file() else None
    return int(known or max(int(lab.max()) for lab in labels if lab.numel()) + 1)


def read_metrics(path: str | Path, stage: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the `{stage}` stage first")
    try:
        return read_json(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """A model's metadata sidecar; missing is allowed (shown as unknown in the table).

    A teacher converted from a model pre-trained here names its source file; the source's own
    sidecar supplies `method` and `epochs` when the converted metadata lacks them.
    """
    path = Path(path)
    if not path.is_file():
        log.warning("%s: no model metadata; architecture and method shown as unknown", path)
        return {}
    meta = read_json(path)
    source = meta.get("source_path")
    if "method" not in meta and source and Path(source).with_suffix(".json").is_file():
        origin = read_json(Path(source).with_suffix(".json"))
        meta.update({k: origin[k] for k in ("method", "epochs") if k in origin and k not in meta})
    return meta


def read_training_log(path: str | Path) -> dict[str, list[float]] | None:
    """Columns of a per-step training CSV (`step,epoch,loss,lr[,...]`), or None when the file is
    absent or holds no rows (e.g. an external teacher was not pre-trained here)."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in LOG_COLUMNS if c not in header]
        if header and missing:
            raise ValueError(f"{path}: header {header} lacks columns {missing} "
                             f"(expected {', '.join(LOG_COLUMNS)}, ...)")
        columns: dict[str, list[float]] = {c: [] for c in header}
        for line, row in enumerate(reader, start=2):
            for column in header:
                value = row.get(column)
                try:
                    columns[column].append(float(value) if value not in ("", None) else math.nan)
                except ValueError:
                    raise ValueError(f"{path}:{line}: column '{column}' is not a number: "
                                     f"{value!r}") from None
    if not columns or not columns["step"]:
        return None
    return columns


def stage_seconds(metrics_dir: str | Path,
                  exclude: Sequence[str | Path] = ()) -> dict[str, float]:
    """`{file name: seconds}` of every metrics JSON in `metrics_dir` with a top-level number
    `seconds` (the stages' wall times)."""
    skip = {Path(p).resolve() for p in exclude}
    found: dict[str, float] = {}
    for path in sorted(Path(metrics_dir).glob("*.json")):
        if path.resolve() in skip:
            continue
        try:
            seconds = read_json(path).get("seconds")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            found[path.name] = float(seconds)
    return found


# ----------------------------------------------------------------------------- summary


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a nested metrics dict as `{"holdout.top1": ..}`; lists and text are left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


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


def _lr(metrics: Mapping[str, Any]) -> str:
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
                     f"{best_sweep(kh.get('sweep_top1', {}))} | {_lr(linear[model])} | "
                     f"{_fmt(lh.get('top1'))} | {_fmt(lh.get('top5'))} |")
    return "\n".join(lines)


def noise_points(accuracy: float, n: int) -> float:
    """Two standard errors (points) of an accuracy measured on n samples."""
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    return 200.0 * math.sqrt(max(p * (1 - p), 1.0 / max(n, 1)) / max(n, 1))


@dataclass(frozen=True)
class ReadingContext:
    """The settings the reading paragraph may point at."""

    n_test: int
    image_size: int
    teacher_arch: str
    student_arch: str
    teacher_small_images: bool
    student_small_images: bool
    teacher_epochs: int | None  # None: an external checkpoint
    baseline_epochs: int | None
    distill_epochs: int


def _order(values: Mapping[str, float]) -> str:
    names = {"teacher": "teacher", "baseline": "baseline", "student": "SEED student"}
    ranked = sorted(values.items(), key=lambda kv: -kv[1])
    return " > ".join(f"{names[m]} ({v:.2f})" for m, v in ranked)


def reading_paragraph(summary: Mapping[str, Mapping[str, float]], ctx: ReadingContext) -> str:
    """A short, number-driven reading: does teacher > SEED > baseline hold, and if not, which
    setting would most likely change it."""
    lin = {m: summary[m]["linear_top1"] for m in MODELS}
    knn = {m: summary[m]["knn_top1"] for m in MODELS}
    noise = noise_points(sum(lin.values()) / 3, ctx.n_test)
    teacher, base, student = lin["teacher"], lin["baseline"], lin["student"]
    out = [f"Linear top-1 ranks {_order(lin)}; kNN top-1 ranks {_order(knn)}. With "
           f"{ctx.n_test} test images, differences below about {noise:.1f} points are within "
           f"sampling noise (two standard errors)."]
    gain, knn_gain = student - base, knn["student"] - knn["baseline"]
    if gain > noise:
        out.append(f"Distillation helped: the SEED student beats the same {ctx.student_arch} "
                   f"trained with MoCo-v2 alone by {gain:+.2f} points linear and {knn_gain:+.2f} "
                   f"kNN.")
    elif gain >= -noise:
        out.append(f"The SEED student is within noise of the baseline ({gain:+.2f} linear, "
                   f"{knn_gain:+.2f} kNN): distillation did not measurably help in this run.")
    else:
        out.append(f"The SEED student is worse than the baseline ({gain:+.2f} linear, "
                   f"{knn_gain:+.2f} kNN).")

    expected = teacher > student + noise and student > base + noise
    if expected:
        out.append(f"This is the ordering the SEED paper reports (teacher > SEED > baseline). "
                   f"The remaining teacher-student gap of {teacher - student:.2f} points is what "
                   f"more distillation epochs (distill.epochs = {ctx.distill_epochs}; the paper "
                   f"uses 200 and more) would narrow.")
        return " ".join(out)

    levers: list[str] = []
    stem_hint = ctx.image_size <= 64
    if teacher <= base + noise:
        if gain > noise:
            out.append(f"The teacher itself is not clearly better than the small baseline "
                       f"({teacher - base:+.2f} points linear), which caps what distillation "
                       f"can show: teacher > SEED > baseline needs a stronger teacher.")
        else:
            out.append("The teacher is not clearly better than the small baseline, so there is "
                       "little to distil.")
        if ctx.teacher_epochs is not None:
            longer = (f" (it had {ctx.teacher_epochs} epochs"
                      + (", no more than the baseline" if ctx.baseline_epochs is not None
                         and ctx.teacher_epochs <= ctx.baseline_epochs else "") + ")")
            levers.append(f"a longer teacher pre-training{longer}")
        levers.append(f"a wider or deeper teacher than {ctx.teacher_arch}")
        if stem_hint and not ctx.teacher_small_images:
            levers.append(f"the small-image 3x3 stem for {ctx.image_size}-px data "
                          f"(teacher.small_images: true; the ImageNet stem shrinks the image "
                          f"4x before the first block)")
    elif student <= base + noise:
        out.append(f"The teacher is clearly stronger ({teacher - base:+.2f} points over the "
                   f"baseline) but the student did not absorb it.")
        levers.append(f"more distillation epochs (distill.epochs = {ctx.distill_epochs})")
        if stem_hint and not ctx.student_small_images:
            levers.append(f"the small-image 3x3 stem for the student on {ctx.image_size}-px data "
                          f"(student.small_images: true)")
    if student > teacher + noise:
        out.append("The student beats its teacher, which points to an under-trained teacher "
                   "whose embedding is a weak target.")
        if ctx.teacher_epochs is not None and not any("longer" in lv for lv in levers):
            levers.append(f"a longer teacher pre-training (it had {ctx.teacher_epochs} epochs)")
    elif student >= teacher - noise and teacher > base + noise:
        out.append("The student matches its teacher within noise.")
    if levers:
        out.append("Settings most likely to restore teacher > SEED > baseline: "
                   + "; ".join(levers) + ".")
    return " ".join(out)


def render_summary_md(summary: Mapping[str, Mapping[str, float]],
                      metas: Mapping[str, Mapping[str, Any]],
                      knn: Mapping[str, Mapping[str, Any]],
                      linear: Mapping[str, Mapping[str, Any]], ctx: ReadingContext,
                      holdout_fraction: float, seconds: Mapping[str, float],
                      plots: Mapping[str, str]) -> str:
    """The whole `reports/summary.md`; `plots` maps a caption to a path relative to it."""
    any_knn, any_lin = knn["student"], linear["student"]
    lrs = ", ".join(f"{m} {_lr(linear[m])}" for m in MODELS)
    total = sum(seconds.values())
    parts = [
        "# SEED: self-supervised distillation results", "",
        results_table(summary, metas), "",
        f"Numbers are top-1 / top-5 accuracy (%) on the test split ({ctx.n_test} val images). "
        f"kNN: weighted vote of the k = {any_knn.get('k')} nearest L2-normalised backbone "
        f"features, T = {any_knn.get('temperature')}. Linear: MoCo protocol on the frozen "
        f"backbone ({any_lin.get('mode')} mode, {any_lin.get('epochs')} epochs), lr per model: "
        f"{lrs}.", "",
        f"k, T and the linear lr were chosen on a holdout split ({holdout_fraction:.0%} of train, "
        f"class-balanced) carved out of the training set; the test numbers above were computed "
        f"once, with those values.", "",
        "## Holdout split (used for tuning)", "",
        holdout_table(knn, linear), "",
        "## Compute", "",
        f"Pipeline compute time: {total:.0f} s ({total / 60:.1f} min), summed over the "
        f"`seconds` of {len(seconds)} stage metrics files.", "",
        *[f"- `{name}`: {value:.1f} s" for name, value in seconds.items()], "",
        "## Reading the numbers", "",
        reading_paragraph(summary, ctx), "",
    ]
    if plots:
        parts += ["## Plots", ""] + [f"![{caption}]({path})" for caption, path in plots.items()]
        parts.append("")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- projection


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project `(N, F)` onto its first two principal components.

    Returns:
        coordinates `(N, 2)` and the explained variance ratio of each component `(2,)`. Each
        component's sign is fixed (largest loading positive) so reruns draw the same picture.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 rows of (N, F), got {tuple(x.shape)}")
    centred = x.double() - x.double().mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = vh[:2]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    var = s ** 2
    ratio = var[:2] / var.sum().clamp_min(1e-300)
    if comps.shape[0] < 2:  # a 1-D feature space: pad the second axis with zeros
        comps = torch.cat([comps, torch.zeros_like(comps)])
        ratio = torch.cat([ratio, torch.zeros(1, dtype=ratio.dtype)])
    return (centred @ comps.T).float(), ratio.float()


def subsample(n: int, max_points: int, seed: int) -> torch.Tensor:
    """Sorted random row indices (all rows when n <= max_points)."""
    if n <= max_points:
        return torch.arange(n)
    return torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed))
                      [:max_points]).values


def class_label(class_names: Sequence[str] | None, c: int) -> str:
    return class_names[c] if class_names and c < len(class_names) else str(c)


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def plot_training_curves(logs: Mapping[str, dict[str, list[float]] | None],
                         path: str | Path) -> None:
    """Loss and lr against step for every present log; distillation diagnostics if logged."""
    plt = _pyplot()
    present = {name: log_ for name, log_ in logs.items() if log_}
    extra = [c for c in ("agreement", "queue_entropy")
             if any(c in log_ for log_ in present.values())]
    panels = 2 + bool(extra)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4))
    for name, columns in present.items():
        axes[0].plot(columns["step"], columns["loss"], label=name, linewidth=0.9)
        axes[1].plot(columns["step"], columns["lr"], label=name, linewidth=0.9)
        for c in extra:
            if c in columns:
                axes[2].plot(columns["step"], columns[c], label=f"{name}: {c}", linewidth=0.9)
    for ax, title in zip(axes, ("loss", "learning rate", "distillation diagnostics")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    absent = [name for name, log_ in logs.items() if not log_]
    if absent:
        fig.text(0.01, -0.02, "absent (not run here, e.g. an external teacher): "
                 + ", ".join(absent), fontsize=8)
    if not present:
        axes[0].text(0.5, 0.5, "no training logs", ha="center", transform=axes[0].transAxes)
    _save(fig, path)


def plot_per_class(per_class: Mapping[str, Mapping[str, Sequence[float | None]]],
                   class_names: Sequence[str] | None, path: str | Path) -> None:
    """Grouped bars: one panel per protocol (`{"kNN": {model: [per-class %]}, ...}`)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(per_class), 1, figsize=(11, 3.4 * len(per_class)),
                             squeeze=False)
    for ax, (protocol, models) in zip(axes[:, 0], per_class.items()):
        count = max(len(v) for v in models.values())
        width = 0.8 / max(len(models), 1)
        for i, (model, values) in enumerate(models.items()):
            ys = [math.nan if v is None else v for v in values]
            ax.bar([c + (i - (len(models) - 1) / 2) * width for c in range(len(ys))], ys,
                   width=width, label=model)
        ax.set_xticks(range(count))
        ax.set_xticklabels([class_label(class_names, c) for c in range(count)], rotation=30,
                           ha="right", fontsize=8)
        ax.set_ylabel(f"{protocol} top-1 (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)


def plot_embeddings(panels: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    class_names: Sequence[str] | None, path: str | Path) -> None:
    """Side-by-side 2-D scatters `{title: (xy (N, 2), labels (N,), explained ratio (2,))}`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.2), squeeze=False)
    num_classes = max(int(labels.max()) + 1 for _, labels, _ in panels.values())
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    for ax, (title, (xy, labels, ratio)) in zip(axes[0], panels.items()):
        for c in range(num_classes):
            mask = labels == c
            if bool(mask.any()):
                ax.scatter(xy[mask, 0], xy[mask, 1], s=5, alpha=0.7, color=cmap(c % cmap.N),
                           label=class_label(class_names, c))
        ax.set_title(title)
        ax.set_xlabel(f"PC1 ({100 * float(ratio[0]):.1f}% var.)")
        ax.set_ylabel(f"PC2 ({100 * float(ratio[1]):.1f}% var.)")
    axes[0, -1].legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save(fig, path)


def relative_to(path: str | Path, start: str | Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())
