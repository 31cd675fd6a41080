"""Benchmark `knn_classify` (chunked bank scan) against a plain full-matrix weighted kNN.

Prints JSON: median wall time of each, their peak extra resident memory (measured from Linux's
VmHWM after resetting it, where allowed) and the chunked version's memory estimate.

    python bench/bench_knn.py [--bank 200000 --dim 512 --queries 2000 --k 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from seed_core.evaluation.knn import BANK_CHUNK, TEST_CHUNK, knn_classify, knn_vote

MIB = 1 << 20


def full_matrix_knn(train_features: torch.Tensor, train_labels: torch.Tensor,
                    test_features: torch.Tensor, k: int, temperature: float,
                    num_classes: int) -> torch.Tensor:
    """The textbook version: normalise everything, one (M, N) similarity matrix, one top-k."""
    sims = F.normalize(test_features, dim=1) @ F.normalize(train_features, dim=1).T
    top_sim, top_idx = sims.topk(k, dim=1)
    return knn_vote(top_sim, train_labels[top_idx], temperature, num_classes)


def _status_kib(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[dict, torch.Tensor]:
    """Median time and peak extra memory of `fn()` over `repeats` runs, and its last output."""
    times, peaks = [], []
    for _ in range(repeats):
        can_reset = _reset_peak()
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        peak = _status_kib("VmHWM")
        if can_reset and before is not None and peak is not None:
            peaks.append((peak - before) / 1024)
    return {"median_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
            "peak_extra_mib_measured": round(max(peaks), 1) if peaks else None}, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(args.bank, args.dim, generator=g)
    labels = torch.randint(0, args.classes, (args.bank,), generator=g)
    queries = torch.randn(args.queries, args.dim, generator=g)
    call = (bank, labels, queries, args.k, args.temperature, args.classes)

    chunked, chunked_scores = measure(lambda: knn_classify(*call), args.repeats)
    full, full_scores = measure(lambda: full_matrix_knn(*call), args.repeats)
    same = torch.equal(chunked_scores.argmax(1), full_scores.argmax(1))
    del chunked_scores, full_scores
    test_chunk = min(TEST_CHUNK, args.queries)
    bank_chunk = min(BANK_CHUNK, args.bank)
    chunked["peak_extra_mib_estimate"] = round(
        4 * test_chunk * (bank_chunk + 2 * args.k) / MIB  # similarity block + merge buffers
        + 4 * bank_chunk * args.dim / MIB  # one normalised bank chunk
        + 12 * args.queries * args.k / MIB, 1)  # running top-k values and indices
    full["peak_extra_mib_estimate"] = round(
        4 * (args.queries * args.bank + args.bank * args.dim) / MIB, 1)  # sims + normalised bank
    print(json.dumps({"bank": args.bank, "dim": args.dim, "queries": args.queries, "k": args.k,
                      "threads": torch.get_num_threads(),
                      "chunks": {"test": test_chunk, "bank": bank_chunk},
                      "chunked": chunked, "full_matrix": full,
                      "same_predictions": same,
                      "speed_ratio_full_over_chunked": round(full["median_s"]
                                                             / chunked["median_s"], 2)},
                     indent=2))


if __name__ == "__main__":
    main()
