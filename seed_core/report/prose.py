"""The report's prose: an honest, number-driven reading of the results, and the whole
`reports/summary.md` (pure functions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from seed_core.report.tables import MODELS, holdout_table, lr_label, results_table


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
    lrs = ", ".join(f"{m} {lr_label(linear[m])}" for m in MODELS)
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


