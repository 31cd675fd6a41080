"""DVC stage `fashion_mnist`: Fashion-MNIST IDX files -> SEED TSVs.

Writes `train.tsv`/`.lineidx` (the 60k training set, or a class-balanced `data.limit_train`
subset), `val.tsv`/`.lineidx` (the official 10k test set, or `data.limit_val` of it) and
`labelmap.txt` into --out, atomically, plus per-split/per-class counts in --metrics. Missing,
corrupt or truncated IDX files, a bad `data.*` value and a full disk stop it with one line that
says what to do (exit status 1), and leave the previous --out untouched.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import program
from seed_core.config import ConfigError, DataConfig, load_params
from seed_core.data import fashion_mnist as fm
from seed_core.data.tsv import write_tsv
from seed_core.io import atomic_dir, write_json, write_text
from seed_core.stagekit import run_times, setup_logging, tracked, user_errors

log = logging.getLogger("stages.fashion_mnist")

# output split -> original split ("val" is the official test set: SEED evaluates on ImageNet val)
SPLITS = {"train": "train", "val": "test"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/fashion_mnist")
    parser.add_argument("--metrics", default="metrics/fashion_mnist.json")
    return parser.parse_args(argv)


def export(data: DataConfig, out_dir: Path) -> dict:
    """Write both splits and the labelmap into `out_dir`; returns the counts."""
    limits = {"train": data.limit_train, "val": data.limit_val}
    metrics: dict = {"num_classes": len(fm.CLASS_NAMES)}
    with atomic_dir(out_dir) as tmp_dir:
        for split, source in SPLITS.items():
            images, labels = fm.load_split(data.source_dir, source)
            try:
                indices = fm.balanced_subset(labels, limits[split], data.seed)
            except ValueError as err:
                raise ConfigError(f"params: 'data.limit_{split}' {err}; lower it (0 = all)",
                                  f"data.limit_{split}") from None
            records = fm.iter_records(images, labels, indices, source)
            written = write_tsv(tmp_dir / f"{split}.tsv",
                                tqdm(records, total=len(indices), desc=split, unit="img",
                                     disable=not sys.stderr.isatty()))
            metrics[split] = {"samples": written, "per_class": fm.class_counts(labels[indices])}
            log.info("%s: %d of %d images from %s", split, written, len(labels), data.source_dir)
        write_text(tmp_dir / "labelmap.txt", "\n".join(fm.CLASS_NAMES) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    with user_errors("fashion_mnist"):
        params = load_params(args.params)
        with tracked("fashion_mnist", params, params_path=args.params) as tracker:
            started = time.perf_counter()
            metrics = export(params.data, Path(args.out))
            metrics.update(seconds=round(time.perf_counter() - started, 3), **run_times())
            write_json(args.metrics, metrics)
            tracker.log_metrics({f"{split}_samples": metrics[split]["samples"]
                                 for split in SPLITS})
    return 0


if __name__ == "__main__":
    program.run(main)
