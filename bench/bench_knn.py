"""kNN at ImageNet size: `knn_classify` against faiss's exact inner-product search; prints JSON.

A synthetic, seeded bank (default 1,281,167 x 128, ImageNet's train size; 1,000 classes, each
sample its class centre plus noise) and 50,000 queries. Each method runs in a fresh subprocess
that first builds the data, so its peak extra memory is its own: the resident-set high-water
mark (Linux VmHWM, reset through /proc/self/clear_refs after the data are built; where that is
not allowed, the process's whole peak, an upper bound) minus the resident set before the call;
on CUDA, the peak of torch's allocator minus the queries it holds. tracemalloc cannot see torch's
buffers, so it is not used.

- `ours`: `knn_neighbors` then `knn_vote` (the two steps of `knn_classify`) on the raw
  features (normalised inside).
- `faiss`: `faiss.IndexFlatIP` on L2-normalised copies (`faiss.normalize_L2`), `add`, `search`,
  then the same vote. A benchmark reference only (`pip install faiss-cpu`); without it the JSON
  says so and the rest still runs.

Agreement: the neighbours of both methods, and of each against an exact float64 search on the
first `--check-queries` queries (recall@k); predictions of both. Goals: peak extra memory
<= 1 GiB, time <= 1.5 x faiss.

    python bench/bench_knn.py [--bank 1281167 --queries 50000 --dim 128 --k 20]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from seed_core.evaluation.knn import knn_neighbors, knn_vote

MIB = 1 << 20
GOALS = {"peak_extra_mib_max": 1024, "time_over_faiss_max": 1.5}
GENERATION_CHUNK = 65536


def synthetic(n: int, dim: int, classes: int, seed: int, centres: torch.Tensor,
              noise: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` samples, each its class centre plus Gaussian noise, written chunk by chunk so the
    builder's own temporaries stay small (they would otherwise set the memory high-water mark)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    features = torch.empty(n, dim)
    for start in range(0, n, GENERATION_CHUNK):
        rows = slice(start, start + GENERATION_CHUNK)
        features[rows] = torch.randn(features[rows].shape, generator=generator).mul_(noise)
        features[rows] += centres[labels[rows]]
    return features, labels


def build_data(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    # unit-variance centres, noise 3 per dimension: a same-class pair has cosine ~0.1, an
    # unrelated one 0 +- 0.09, so neighbours mix classes as real features' do
    generator = torch.Generator().manual_seed(args.seed)
    centres = torch.randn(args.classes, args.dim, generator=generator)
    bank, bank_labels = synthetic(args.bank, args.dim, args.classes, args.seed + 1, centres)
    queries, query_labels = synthetic(args.queries, args.dim, args.classes, args.seed + 2, centres)
    return {"bank": bank, "bank_labels": bank_labels, "queries": queries,
            "query_labels": query_labels}


# ------------------------------------------------------------------ memory


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak extra memory of the code run between `start()` and `stop()`, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated minus the memory held before"
            return
        self.reset = _reset_peak()
        self.base = _status_kib("VmRSS") or 0
        self.method = ("VmHWM (reset by clear_refs) minus VmRSS before" if self.reset else
                       "ru_maxrss of the process minus VmRSS before (upper bound: no reset)")

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
        peak = _status_kib("VmHWM") if self.reset else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak - self.base) / 1024


def cpu_seconds() -> float:
    """CPU time of this process, all threads: unlike wall time, barely inflated when other
    jobs share the cores (each run is sequential, so wall times meet different loads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------ one method, in a worker


def run_ours(data: dict[str, torch.Tensor], args: argparse.Namespace,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`knn_classify`'s two steps, so the neighbours come back for the agreement check."""
    # as stages/knn.py: the bank stays in host memory, the queries on the device
    queries = data["queries"].to(device)
    sims, idx = knn_neighbors(data["bank"], queries, args.k)
    labels = data["bank_labels"].to(idx.device)[idx]
    return knn_vote(sims, labels, args.temperature, args.classes), sims, idx


def load_faiss():
    """faiss, imported where it is used: a benchmark reference only, not a dependency of the
    pipeline, and absent from most machines (`pip install faiss-cpu`)."""
    import faiss

    return faiss


def run_faiss(data: dict[str, torch.Tensor], args: argparse.Namespace,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    faiss = load_faiss()
    bank = data["bank"].numpy().copy()
    queries = data["queries"].numpy().copy()
    faiss.normalize_L2(bank)
    faiss.normalize_L2(queries)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    del bank  # the index holds its own copy
    sims, idx = index.search(queries, args.k)
    sims, idx = torch.from_numpy(sims), torch.from_numpy(idx)
    return knn_vote(sims, data["bank_labels"][idx], args.temperature, args.classes), sims, idx


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.worker == "faiss":
            load_faiss().omp_set_num_threads(args.threads)
    data = build_data(args)
    run = {"ours": run_ours, "faiss": run_faiss}[args.worker]
    memory = PeakMemory(device)
    memory.start()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    scores, sims, idx = run(data, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    peak = memory.stop()
    prediction = scores.argmax(1).cpu()
    torch.save({"sims": sims.cpu(), "idx": idx.cpu(), "prediction": prediction}, args.out)
    top1 = (prediction == data["query_labels"]).float().mean().item() * 100
    print(json.dumps({"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                      "peak_extra_mib": round(peak, 1),
                      "memory_method": memory.method, "top1": round(top1, 2),
                      "threads": torch.get_num_threads()}))


# ------------------------------------------------------------------ the parent


def exact_neighbors(bank: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k nearest by cosine, in float64 (the ground truth for a few queries)."""
    queries = F.normalize(queries.double(), dim=1)
    best_sim = torch.full((queries.shape[0], 0), 0.0, dtype=torch.float64)
    best_idx = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    for start in range(0, bank.shape[0], GENERATION_CHUNK):
        sims = queries @ F.normalize(bank[start:start + GENERATION_CHUNK].double(), dim=1).T
        sims = torch.cat([best_sim, sims], dim=1)
        idx = torch.cat([best_idx, torch.arange(start, start + sims.shape[1] - best_sim.shape[1])
                         .expand(queries.shape[0], -1)], dim=1)
        best_sim, pos = sims.topk(min(k, sims.shape[1]), dim=1)
        best_idx = idx.gather(1, pos)
    return best_idx


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of the true k neighbours that `found` contains."""
    hits = (found.unsqueeze(2) == truth.unsqueeze(1)).any(2).float()
    return hits.mean().item()


def spawn(method: str, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--out", str(out),
               "--device", args.device, "--bank", str(args.bank), "--queries", str(args.queries),
               "--dim", str(args.dim), "--k", str(args.k), "--classes", str(args.classes),
               "--temperature", str(args.temperature), "--seed", str(args.seed),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {method} worker failed (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=1_281_167)
    parser.add_argument("--queries", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--check-queries", type=int, default=200,
                        help="queries checked against an exact float64 search")
    parser.add_argument("--skip-faiss", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads of both methods (default: all): on a busy shared "
                             "machine, 1 keeps threads from waiting for each other")
    parser.add_argument("--worker", choices=["ours", "faiss"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    has_faiss = importlib.util.find_spec("faiss") is not None and not args.skip_faiss
    report: dict = {"benchmark": "knn", "bank": args.bank, "queries": args.queries,
                    "dim": args.dim, "k": args.k, "device": args.device,
                    "threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "goals": GOALS}
    with tempfile.TemporaryDirectory(prefix="bench_knn_") as tmp:
        results = {"ours": spawn("ours", args, Path(tmp) / "ours.pt")}
        outputs = {"ours": torch.load(Path(tmp) / "ours.pt", weights_only=True)}
        if has_faiss:
            results["faiss"] = spawn("faiss", args, Path(tmp) / "faiss.pt")
            outputs["faiss"] = torch.load(Path(tmp) / "faiss.pt", weights_only=True)
    report["ours"] = results["ours"]
    report["faiss"] = results.get("faiss") or {
        "available": False, "reason": "faiss is not installed (pip install faiss-cpu)"
        if not args.skip_faiss else "--skip-faiss"}

    data = build_data(args)
    n = min(args.check_queries, args.queries)
    truth = exact_neighbors(data["bank"], data["queries"][:n], args.k)
    agreement = {f"recall_vs_exact_{name}": round(recall(out["idx"][:n], truth), 5)
                 for name, out in outputs.items()}
    if "faiss" in outputs:
        ours, theirs = outputs["ours"], outputs["faiss"]
        agreement["same_neighbours_in_order"] = round(
            (ours["idx"] == theirs["idx"]).all(1).float().mean().item(), 5)
        agreement["neighbour_recall_ours_vs_faiss"] = round(recall(ours["idx"], theirs["idx"]), 5)
        agreement["max_similarity_difference"] = float(
            (ours["sims"] - theirs["sims"]).abs().max())
        agreement["same_predictions"] = round(
            (ours["prediction"] == theirs["prediction"]).float().mean().item(), 5)
        report["time_ratio_ours_over_faiss"] = round(
            results["ours"]["seconds"] / results["faiss"]["seconds"], 3)
        report["cpu_time_ratio_ours_over_faiss"] = round(
            results["ours"]["cpu_seconds"] / results["faiss"]["cpu_seconds"], 3)
        report["time_goal_met"] = report["time_ratio_ours_over_faiss"] <= GOALS[
            "time_over_faiss_max"]
    report["agreement"] = agreement
    report["memory_goal_met"] = results["ours"]["peak_extra_mib"] <= GOALS["peak_extra_mib_max"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
