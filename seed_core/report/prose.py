"""The report's prose: an honest, number-driven reading of the results, and the whole
`reports/summary.md` (pure functions).

Every claim is backed by the metrics it cites: "chosen on the holdout" only for the values the
metrics files say were, and model-vs-model claims only from the paired tests on the same test
images (McNemar, two-sided, p < `ALPHA`), never from the accuracies alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from seed_core.evaluation.stats import ALPHA
from seed_core.report.tables import (MODELS, PAIR_NAMES, PROTOCOLS, holdout_table, knn_label,
                                     knn_selected, lr_edge, lr_label, p_label, paired_table,
                                     results_table, signed)

Paired = Mapping[str, Mapping[str, Mapping[str, Any]]]  # paired[protocol][pair] -> comparison


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


NAMES = {"teacher": "teacher", "baseline": "baseline", "student": "SEED student"}


def _order(values: Mapping[str, float]) -> str:
    ranked = sorted(values.items(), key=lambda kv: -kv[1])
    return " > ".join(f"{NAMES[m]} ({v:.2f})" for m, v in ranked)


def verdict(comparison: Mapping[str, Any] | None) -> str | None:
    """The paired test's verdict on the first model of a pair: "+" significantly better, "-"
    significantly worse, "0" when the test cannot tell them apart; None without a test."""
    if not comparison:
        return None
    if comparison["p_value"] >= ALPHA:
        return "0"
    return "+" if comparison["difference"] > 0 else "-"


def _protocols(paired: Paired, pair: str, sign: str) -> list[str]:
    return [PROTOCOLS[p] for p in PROTOCOLS if verdict(paired.get(p, {}).get(pair)) == sign]


def _both_or(names: Sequence[str]) -> str:
    return "both kNN and linear top-1" if len(names) == len(PROTOCOLS) else f"{names[0]} only"


def _test_phrase(paired: Paired, pair: str) -> str:
    parts = []
    for protocol, label in PROTOCOLS.items():
        c = paired.get(protocol, {}).get(pair)
        if c:
            parts.append(f"{signed(c['difference'])} {label} [{signed(c['ci_low'])}, "
                         f"{signed(c['ci_high'])}], p = {p_label(c['p_value'])}")
    return f"{PAIR_NAMES[pair]} " + "; ".join(parts)


def ordering_holds(paired: Paired) -> list[str]:
    """The protocols on which teacher > SEED > baseline holds with every step significant."""
    return [PROTOCOLS[p] for p in PROTOCOLS
            if verdict(paired.get(p, {}).get("teacher_vs_student")) == "+"
            and verdict(paired.get(p, {}).get("student_vs_baseline")) == "+"]


def ordering_sentence(paired: Paired) -> str:
    """One sentence: where the paper's ordering holds by the paired tests."""
    holds = ordering_holds(paired)
    where = ("both kNN and linear top-1" if len(holds) == len(PROTOCOLS)
             else f"{holds[0]} top-1 only" if holds else "neither kNN nor linear top-1")
    return (f"Teacher > SEED > baseline, every step significant (McNemar p < {ALPHA:g}), "
            f"holds on {where}.")


def reading_paragraph(summary: Mapping[str, Mapping[str, float]], paired: Paired,
                      ctx: ReadingContext) -> str:
    """A short, number-driven reading: does teacher > SEED > baseline hold by the paired tests,
    and if not, which setting would most likely change it."""
    lin = {m: summary[m]["linear_top1"] for m in MODELS}
    knn = {m: summary[m]["knn_top1"] for m in MODELS}
    out = [f"Linear top-1 ranks {_order(lin)}; kNN top-1 ranks {_order(knn)}."]
    if not any(paired.get(p) for p in PROTOCOLS):
        out.append("No per-sample test predictions were found, so no paired test was run and "
                   "none of these differences is called significant or not (run the knn and "
                   "linear stages with --predictions).")
        return " ".join(out)
    out.append(f"Paired tests on the same {ctx.n_test} test images (difference in points, 95% "
               f"paired-bootstrap interval, two-sided McNemar p; significant means p < "
               f"{ALPHA:g}): " + "; ".join(_test_phrase(paired, pair) for pair in PAIR_NAMES)
               + ".")

    holds = ordering_holds(paired)
    gain_lin = lin["student"] - lin["baseline"]
    gain_knn = knn["student"] - knn["baseline"]
    better = _protocols(paired, "student_vs_baseline", "+")
    worse = _protocols(paired, "student_vs_baseline", "-")
    if better:
        out.append(f"Distillation helped: the SEED student beats the same {ctx.student_arch} "
                   f"trained with MoCo-v2 alone by {gain_lin:+.2f} points linear and "
                   f"{gain_knn:+.2f} kNN, significantly on {_both_or(better)}.")
    elif worse:
        out.append(f"The SEED student is significantly worse than the baseline on "
                   f"{_both_or(worse)} ({gain_lin:+.2f} linear, {gain_knn:+.2f} kNN).")
    else:
        out.append(f"The SEED student is not significantly different from the baseline "
                   f"({gain_lin:+.2f} linear, {gain_knn:+.2f} kNN): distillation did not "
                   f"measurably help in this run.")

    if len(holds) == len(PROTOCOLS):
        out.append(f"Teacher > SEED > baseline holds on both kNN and linear top-1, every step "
                   f"significant: the ordering the SEED paper reports. The student stays "
                   f"{lin['teacher'] - lin['student']:.2f} points (linear) below the teacher "
                   f"after distill.epochs = {ctx.distill_epochs} (the paper distils for 200 "
                   f"epochs and more; longer runs were not measured here).")
        return " ".join(out)
    out.append("Teacher > SEED > baseline, every step significant, holds on "
               + (f"{holds[0]} top-1 only." if holds else "neither kNN nor linear top-1."))

    levers: list[str] = []
    stem_hint = ctx.image_size <= 64
    teacher_ahead = _protocols(paired, "teacher_vs_baseline", "+")
    student_ahead = _protocols(paired, "teacher_vs_student", "-")
    if len(teacher_ahead) < len(PROTOCOLS):
        where = (f"on {teacher_ahead[0]} only" if teacher_ahead else "on either protocol")
        if better:
            out.append(f"The teacher itself is not clearly better than the small baseline "
                       f"({lin['teacher'] - lin['baseline']:+.2f} points linear; significantly "
                       f"ahead {where}), which caps what distillation can show: teacher > SEED "
                       f"> baseline needs a stronger teacher.")
        else:
            out.append(f"The teacher is not clearly better than the small baseline "
                       f"(significantly ahead {where}), so there is little to distil.")
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
    elif len(better) < len(PROTOCOLS):
        out.append(f"The teacher is significantly stronger than the baseline "
                   f"({lin['teacher'] - lin['baseline']:+.2f} points linear) but the student did "
                   f"not absorb it on {'either protocol' if not better else 'both protocols'}.")
        levers.append(f"more distillation epochs (distill.epochs = {ctx.distill_epochs})")
        if stem_hint and not ctx.student_small_images:
            levers.append(f"the small-image 3x3 stem for the student on {ctx.image_size}-px data "
                          f"(student.small_images: true)")
    if student_ahead:
        out.append(f"The student beats its teacher significantly on {_both_or(student_ahead)}, "
                   f"which points to an under-trained teacher whose embedding is a weak target.")
        if ctx.teacher_epochs is not None and not any("longer" in lv for lv in levers):
            levers.append(f"a longer teacher pre-training (it had {ctx.teacher_epochs} epochs)")
    elif len(teacher_ahead) == len(PROTOCOLS) and not _protocols(paired, "teacher_vs_student",
                                                                 "+"):
        out.append("The student is not significantly different from its teacher.")
    if levers:
        out.append("Settings most likely to restore teacher > SEED > baseline: "
                   + "; ".join(levers) + ".")
    return " ".join(out)


def _models_phrase(models: Sequence[str]) -> str:
    names = [NAMES[m] for m in models]
    return ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]


def _grid(values: Sequence[Any]) -> str:
    return "{" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + "}"


def selection_paragraph(knn: Mapping[str, Mapping[str, Any]],
                        linear: Mapping[str, Mapping[str, Any]],
                        holdout_fraction: float | None) -> str:
    """What was chosen on the holdout split, said only of what the metrics files say was, and
    every choice at an end of its grid called out."""
    share = f"{holdout_fraction:.0%} of train, " if holdout_fraction is not None else ""
    split = (f"a holdout split ({share}class-balanced, the rest of train as the kNN bank / probe "
             f"training set)")
    out = []
    tuned = [m for m in MODELS if knn_selected(knn[m])]
    fixed = [m for m in MODELS if m not in tuned]
    if tuned:
        hold = knn[tuned[0]].get("holdout", {})
        grid = (f" from k ∈ {_grid(hold['grid_k'])} × T ∈ {_grid(hold['grid_temperature'])}"
                if "grid_k" in hold and "grid_temperature" in hold else "")
        rule = ("the configured knn.k and knn.temperature kept unless the best pair beat them "
                "by a one-sided McNemar test on the holdout (p < 0.05)"
                if "rule" in hold else "ties going to the configured knn.k and knn.temperature")
        out.append(f"kNN k and T were chosen per model on {split}{grid}, {rule}: "
                   + "; ".join(f"{NAMES[m]} {knn_label(knn[m])}" for m in tuned) + ".")
    if fixed:
        out.append(f"kNN used the configured k and T, not tuned, for {_models_phrase(fixed)}.")
    lr_tuned = [m for m in MODELS if linear[m].get("selected_on") == "holdout"
                or "lr_top1" in linear[m].get("holdout", {})]
    if lr_tuned:
        grid = linear[lr_tuned[0]].get("holdout", {}).get("lr_top1", {})
        out.append(f"The linear probe's lr was chosen per model on the same split from "
                   f"linear.lrs = {{{', '.join(grid)}}}: "
                   + "; ".join(f"{NAMES[m]} {lr_label(linear[m])}" for m in lr_tuned) + ".")
    lr_edges = [m for m in lr_tuned if lr_edge(linear[m])]
    if lr_edges:
        out.append(f"The lr chosen for {_models_phrase(lr_edges)} is at an end of the grid: the "
                   f"best lr may lie outside it, so extend linear.lrs past that end.")
    knn_edges = [m for m in tuned if any(knn[m].get("holdout", {}).get(key)
                                         for key in ("k_edge", "temperature_edge"))]
    if knn_edges:
        out.append(f"The kNN k or T chosen for {_models_phrase(knn_edges)} is at an end of its "
                   f"grid: extend knn.sweep_k / knn.sweep_temperature past that end.")
    out.append("The test split was then scored once per model with the chosen values.")
    return " ".join(out)


def render_summary_md(summary: Mapping[str, Mapping[str, float]],
                      metas: Mapping[str, Mapping[str, Any]],
                      knn: Mapping[str, Mapping[str, Any]],
                      linear: Mapping[str, Mapping[str, Any]], ctx: ReadingContext,
                      holdout_fraction: float, seconds: Mapping[str, float],
                      plots: Mapping[str, str], paired: Paired | None = None,
                      seeds_md: str | None = None, timing: str | None = None) -> str:
    """The whole `reports/summary.md`; `plots` maps a caption to a path relative to it,
    `paired[protocol][pair]` holds the paired tests, `seeds_md` an optional table over seeds,
    `timing` the paragraph on the run's wall time (`seed_core.report.timing`)."""
    paired = paired or {}
    any_lin = linear["student"]
    total = sum(seconds.values())
    parts = [
        "# SEED: self-supervised distillation results", "",
        results_table(summary, metas), "",
        f"Numbers are top-1 / top-5 accuracy (%) on the test split ({ctx.n_test} val images). "
        f"kNN: weighted vote of the k nearest L2-normalised backbone features with weight "
        f"exp(cos / T). Linear: MoCo protocol on the frozen backbone ({any_lin.get('mode')} "
        f"mode, {any_lin.get('epochs')} epochs).", "",
        selection_paragraph(knn, linear, holdout_fraction), "",
        "## Holdout split (used for choosing k, T and the lr)", "",
        holdout_table(knn, linear), "",
        "## Paired tests (same test images)", "",
    ]
    if any(paired.get(p) for p in PROTOCOLS):
        parts += [paired_table(paired), "",
                  "Two accuracies measured on the same images are correlated, so their "
                  "difference is tested on the images the two models disagree on: McNemar's "
                  "test (exact binomial below 50 disagreements, else chi-square with continuity "
                  "correction) and a paired bootstrap over test images for the interval.", ""]
    else:
        parts += ["No per-sample test predictions were found (run the knn and linear stages "
                  "with --predictions): no paired test.", ""]
    if seeds_md:
        parts += ["## Students over seeds", "", seeds_md, ""]
    parts += [
        "## Compute", "",
        f"Pipeline compute time: {total:.0f} s ({total / 60:.1f} min), summed over the "
        f"`seconds` of {len(seconds)} stage metrics files.", "",
        *[f"- `{name}`: {value:.1f} s" for name, value in seconds.items()], "",
        *([timing, ""] if timing else []),
        "## Reading the numbers", "",
        reading_paragraph(summary, paired, ctx), "",
    ]
    if plots:
        parts += ["## Plots", ""] + [f"![{caption}]({path})" for caption, path in plots.items()]
        parts.append("")
    return "\n".join(parts)
