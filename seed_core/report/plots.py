"""The report's PNG plots, rendered offline (matplotlib, Agg backend): training curves,
per-class accuracy, a 2-D projection of teacher and student embeddings."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from seed_core.io import atomic_path


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
    extra = [c for c in ("agreement", "target_off_positive")
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
