"""The performance section of docs/performance.md, rendered from the benchmarks' JSON
(`bench/results/`) and the training stages' metrics (`metrics/`): no figure in it is typed by hand.

    python bench/render.py docs/performance.md [--check]   # rewrite (or check) between markers

`make bench` writes `bench/results/<name>.json` (each benchmark's one JSON object) and then runs
this. A benchmark that has not been run shows as "not run"; a goal is judged here, from the
figures and the thresholds the benchmark recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from seed_core.io import splice_section, write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- bench: begin -->", "<!-- bench: end -->"
DATA_WAIT_GOAL = 0.05  # issue 10: data wait <= 5% of the step at the default config
OVERHEAD_GOAL_S = 45.0  # issue 10: dvc repro's wall time minus the stages' own seconds


def load(name: str, results: Path) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def step_section(step: Mapping[str, Any]) -> list[str]:
    goals = step.get("goals", {"overhead_max": 1.10, "speedup_min_small_images": 1.2})
    lines = [f"**The SEED step against its parts** (`bench/bench_step.py`: medians of "
             f"{step.get('repeats')} steps, {step.get('clock')} clock, {step.get('threads')} "
             f"thread(s); seconds per step). Overhead = full / (teacher + student + queue floor), "
             f"goal ≤ {goals['overhead_max']}; speed-up = released formulation / ours, goal ≥ "
             f"{goals['speedup_min_small_images']} at small images.", ""]
    rows = []
    for name, case in step.get("cases", {}).items():
        shape = case["case"]
        seconds = {k: v["median_s"] for k, v in case["seconds"].items()}
        small = shape["size"] <= 64
        speed = case["speedup_vs_reference"]
        precision = case.get("precision", {})
        rows.append([
            f"{name}: {shape['teacher']} ({precision.get('teacher', '?')}) → {shape['student']} "
            f"({precision.get('student', '?')}), {shape['size']} px, batch {shape['batch']}, "
            f"K {shape['queue']:,}",
            fmt(seconds["teacher_forward"], 3), fmt(seconds["student_forward_backward_sgd"], 3),
            fmt(case["queue_floor_s"], 3), f"{100 * case['queue_share_of_parts']:.0f}%",
            fmt(seconds["full_step"], 3),
            fmt(seconds["reference_step"], 3),
            f"{case['overhead']:.2f} {verdict(case['overhead'] <= goals['overhead_max'])}",
            f"{speed:.2f} " + (verdict(speed >= goals["speedup_min_small_images"]) if small
                               else "(no goal)"),
            fmt(case["images_per_s"]["full_step"], 0)])
    return lines + table(["case", "teacher fwd", "student fwd+bwd+SGD", "queue floor",
                          "queue share", "full step", "released formulation", "overhead",
                          "speed-up", "img/s"], rows)


def knn_section(knn: Mapping[str, Any]) -> list[str]:
    goals = knn["goals"]
    lines = [f"**kNN at ImageNet size** (`bench/bench_knn.py`: a {knn['bank']:,} × {knn['dim']} "
             f"bank, {knn['queries']:,} queries, k {knn['k']}, {knn['threads']} threads). Goals: "
             f"peak extra memory ≤ {goals['peak_extra_mib_max']:,} MiB, time ≤ "
             f"{goals['time_over_faiss_max']} × faiss's exact `IndexFlatIP`.", ""]
    rows = []
    for name in ("ours", "faiss"):
        if name in knn:
            run = knn[name]
            rows.append([name, fmt(run["seconds"], 1), fmt(run["peak_extra_mib"], 0),
                         fmt(run.get("top1"), 2)])
    lines += table(["", "seconds", "peak extra MiB", "top-1 (synthetic labels)"], rows)
    if "faiss" in knn:
        ratio = knn["time_ratio_ours_over_faiss"]
        agree = knn.get("agreement", {})
        lines += ["", f"Ours / faiss: time {ratio:.2f} "
                      f"({verdict(ratio <= goals['time_over_faiss_max'])}), memory "
                      f"{verdict(knn['ours']['peak_extra_mib'] <= goals['peak_extra_mib_max'])}; "
                      f"same predictions for {100 * agree.get('same_predictions', 0):.2f}% of the "
                      f"queries, recall of the exact neighbours "
                      f"{agree.get('recall_vs_exact_ours', 0):.3f}."]
    else:
        lines += ["", "faiss was not installed (`pip install faiss-cpu`): no reference time."]
    return lines


def linear_section(linear: Mapping[str, Any]) -> list[str]:
    if "skipped" in linear:
        return [f"**Linear evaluation**: not run ({linear['skipped']})."]
    runs, goals = linear["runs"], linear["goals"]
    overrides = ", ".join(f"`{o}`" for o in linear.get("overrides", [])) or "none"
    rows = [[mode, fmt(run["stage_seconds"], 1), fmt(run["test_top1"], 2), str(run["lr"]),
             str(run["epochs"])] for mode, run in runs.items()]
    return ([f"**Linear evaluation, cached features vs the augmented MoCo protocol** "
             f"(`bench/bench_linear.py` on the demo's student; overrides of both runs: "
             f"{overrides}).", ""]
            + table(["mode", "stage seconds", "test top-1", "lr chosen", "epochs"], rows)
            + ["", f"Speed-up {linear['speedup']:.1f}× (goal ≥ {goals['speedup_min']:g}: "
                   f"{verdict(linear['speedup_goal_met'])}); top-1 cached − augmented "
                   f"{linear['top1_cached_minus_augmented']:+.2f} points (goal within "
                   f"{goals['top1_gap_max']}: {verdict(linear['top1_goal_met'])})."])


def versions_section(versions: Mapping[str, Any], *_: Any) -> list[str]:
    if "skipped" in versions:
        return [f"**Throughput against the earlier commit**: not run ({versions['skipped']})."]
    models = versions["models"]
    rows = []
    for stage in ("pretrain", "distill"):
        old, new = versions["versions"]["baseline"][stage], versions["versions"]["current"][stage]
        speed = versions["speedup"][stage]
        rows.append([stage, fmt(old["images_per_s"], 0), fmt(new["images_per_s"], 0),
                     f"{speed:.2f} {verdict(speed >= versions['goal_min'])}",
                     fmt(old["final_loss"], 3), fmt(new["final_loss"], 3)])
    return ([f"**Training throughput against commit {versions['baseline_commit']}** "
             f"(`bench/bench_versions.py`: both versions' own stages under torchrun, teacher "
             f"{models['teacher']}, student {models['student']}, {versions['epochs']} epochs, "
             f"median of {versions['rounds']} alternating rounds, goal ≥ "
             f"{versions['goal_min']}×).", ""]
            + table(["stage", f"img/s at {versions['baseline_commit']}",
                     f"img/s at {versions['current_commit']}", "speed-up",
                     "final loss before", "final loss now"], rows))


def levers_section(levers: Mapping[str, Any]) -> list[str]:
    speedups = levers["speedup_over_fp32"]
    names = sorted({lever for case in speedups.values() for lever in case} - {"fp32"},
                   key=["channels_last", "bf16", "bf16_channels_last", "compile",
                        "fold_bn"].index)
    rows = [[case, *(fmt(values.get(lever)) for lever in names)]
            for case, values in speedups.items()]
    compiled = ", ".join(f"{case} {seconds:.0f} s" for case, seconds
                         in levers.get("compile_seconds", {}).items())
    return ([f"**CPU speed levers** (`bench/bench_levers.py`: speed-up of the step over plain "
             f"fp32, teacher {levers['teacher']}, student {levers['student']}).", ""]
            + table(["step", *names], rows)
            + (["", f"`torch.compile` costs its compilation first: {compiled}."]
               if compiled else []))


def loader_section(loader: Mapping[str, Any]) -> list[str]:
    ours, seed = loader["ours_samples_per_s"], loader["seed_tsv_samples_per_s"]
    rows = [[f"{w} worker(s)", fmt(ours[w], 0), fmt(seed[w], 0),
             f"{ours[w] / seed[w]:.2f}", f"{ours[w] / loader['step_samples_per_s']:.2f}"]
            for w in ours]
    return (recipes_section(loader) + ([""] if loader.get("recipes_per_core") else [])
            + [f"**Training loader** (`bench/bench_loader.py`{measured_on(loader)}: "
             f"{loader['samples']:,} {loader['image']}s in shards, crop {loader['crop']}, batch {loader['batch']}; the "
             f"SEED step at the default config consumes "
             f"{loader['step_samples_per_s']:,.0f} samples/s).", ""]
            + table(["", "ours samples/s", "SEED TSV loader samples/s", "ours / SEED's",
                     "ours / step"], rows))


def measured_on(bench: Mapping[str, Any]) -> str:
    """", <machine>, load average [...] at the start" where the benchmark recorded them (results
    of older runs did not)."""
    if "load_average_at_start" not in bench:
        return ""
    return f", {bench['machine']}, load average {bench['load_average_at_start']} at the start"


def recipes_section(loader: Mapping[str, Any]) -> list[str]:
    """The per-core cost of each recipe's CPU view at 224 px (`recipes_per_core`)."""
    recipes = loader.get("recipes_per_core")
    if not recipes:
        return []
    rows = []
    for name, row in recipes.items():
        on_device = row.get("new_colour_on_device")
        rows.append([f"{name} ({row['size']} px)",
                     fmt(row["old"]["decode_ms"] + row["old"]["transform_ms"]),
                     fmt(row["new"]["decode_ms"] + row["new"]["transform_ms"]),
                     f"{row['speedup_with_decode']:.2f}×",
                     f"{row['speedup_with_decode_colour_on_device']:.2f}×" if on_device else "–",
                     fmt(row["new"]["cores_for_3000_img_per_s"], 1),
                     fmt(row["new"]["cores_for_10000_img_per_s"], 1),
                     fmt(on_device["cores_for_10000_img_per_s"], 1) if on_device else "–"])
    return ([f"**Augmentation per core** (`bench/bench_loader.py`{measured_on(loader)}: one "
             "process, one thread, "
             "ms per sample of decode + the recipe's whole CPU view, on 500×375 JPEGs cut from "
             "real photos; 805c760's torchvision recipe on float tensors against today's; "
             "goal ≥ 3× per core). The columns with colour on the GPU time the CPU part that "
             "remains (decode, crop, flip) when `seed_core.data.device_augment`'s batched "
             "colour and blur run on the device: what `data.colour_on: auto` does when the "
             "stages train on CUDA.", ""]
            + table(["recipe", "805c760 ms", "now ms", "speed-up", "speed-up, colour and "
                     "blur on the GPU", "cores per GPU at 3,000 img/s", "at 10,000 img/s",
                     "at 10,000, colour on the GPU"], rows))


def shards_section(shards: Mapping[str, Any]) -> list[str]:
    rates = shards["records_per_s_median"]
    return [f"**TSV → shards** (`bench/bench_shards.py`: {shards['records']:,} JPEGs of "
            f"{shards['image_side']} px, {shards['tsv_mib']} MiB): "
            f"{rates['shuffled_workers_1']:,.0f} records/s with 1 worker, "
            f"{rates['shuffled_workers_2']:,.0f} with {shards['cpus']}; in a global shuffle "
            f"{shards['shuffled_over_tsv_order']['workers_1']:.2f}× the rate of the TSV's "
            f"order (1 worker); peak memory {shards['peak_rss_mib']} MiB (it grew "
            f"{shards['peak_rss_growth_during_conversion_mib']} MiB while converting)."]


def open_shards_section(bench: Mapping[str, Any]) -> list[str]:
    """`bench/bench_open_shards.py`: opening an ImageNet-sized shard set, fresh processes."""
    median, worst = bench["seconds_median"], bench["seconds_max"]
    phases = [("`open_shards` (manifest, shard files looked up)", "open_s"),
              ("`.index` (memory-mapped `index.bin`, checked)", "index_s"),
              (f"`steps_per_epoch` (batch {bench['batch']})", "steps_s"),
              ("epoch 0's order, plan and first batch's samples", "plan_s"),
              ("all of the above", "total_s"), ("imports, for scale", "import_s")]
    rows = [[label, fmt(1e3 * median[key], 1), fmt(1e3 * worst[key], 1)]
            for label, key in phases]
    open_index = bench.get("peak_rss_growth_open_index_mib_median")
    size = "an ImageNet-sized" if bench["samples"] == 1_281_167 else "a"
    return ([f"**Opening {size} shard set** (`bench/bench_open_shards.py`{measured_on(bench)}: "
             f"a synthetic set of {bench['shards']:,} shards and {bench['samples']:,} samples "
             f"({bench['classes']:,} classes), a converter-style manifest of "
             f"{bench['manifest_kib']:,} KiB and a real {bench['index_mib']} MiB `index.bin`; "
             f"each of {bench['repeat']} repetition(s) in a fresh process, the index in the page "
             f"cache; ms).", ""]
            + table(["phase", "median ms", "worst ms"], rows)
            + ["", f"{bench['opened_samples']:,} samples opened, {bench['steps_per_epoch']:,} "
                   f"steps an epoch; peak memory growth "
                   f"{fmt(bench['peak_rss_growth_mib_median'], 1)} MiB (median; "
                   + (f"{fmt(open_index, 1)} MiB up to the checked index, the rest the epoch's "
                      f"order; " if open_index is not None else "")
                   + f"{bench['memory_method']}); {bench['open_files_delta']} more open file(s) "
                   f"after opening."])


def remote_epoch_section(bench: Mapping[str, Any]) -> list[str]:
    """`bench/bench_remote_epoch.py`: one epoch over HTTP through injected faults."""
    if not bench.get("ok"):
        return [f"**One remote epoch through a flaky server** (`bench/bench_remote_epoch.py`): "
                f"**failed**: {bench['samples_read']:,} of {bench['manifest_samples']:,} samples "
                f"read, {bench['lost']:,} lost, {bench['duplicated']:,} duplicated; "
                f"{bench.get('error') or 'no error raised'}."]
    faults, retries = bench["faults_injected"], bench["retries_observed"]
    meaning = {"503": "HTTP 503", "drop": "body cut half-way, Content-Length sent",
               "drop-nolength": "body cut half-way, no Content-Length",
               "stall": f"no reply for {bench['stall_s']:g} s (> the timeout)",
               "slow": f"reply after {bench['slow_s']:g} s (< the timeout: not to be retried)"}
    # each fault is retried once, except the reply that is slow but within the timeout
    rows = [[f"`{kind}`: {meaning.get(kind, kind)}", str(count), str(retries.get(kind, 0)),
             "yes" if retries.get(kind, 0) == (0 if kind == "slow" else count) else "**no**"]
            for kind, count in faults.items()]
    env = ", ".join(f"`{k}={v}`" for k, v in bench["fetch_env"].items())
    epoch = bench["epoch_s_median"]
    lost = bench["lost"] + bench["duplicated"] + bench["unexpected"] + bench["wrong_labels"]
    return ([f"**One remote epoch through a flaky server** (`bench/bench_remote_epoch.py`, "
             f"{bench['machine']}: {bench['samples']:,} JPEGs in {bench['shards']} shards from "
             f"the converter, {bench['served_kib']:,} KiB served over HTTP on 127.0.0.1; "
             f"`train_loader` with {bench['workers']} worker(s), batch {bench['batch']}; a fresh "
             f"`SEED_SHARD_CACHE` per run; {env}; faults on a fixed seeded schedule).", ""]
            + table(["fault injected", "times", "retried", "as expected"], rows)
            + ["", f"Samples read {bench['samples_read']:,} of the manifest's "
                   f"{bench['manifest_samples']:,}: {lost} lost, duplicated or mislabelled, "
                   f"{bench['replaced_unreadable']} replaced (nothing lost: "
                   f"{verdict(lost + bench['replaced_unreadable'] == 0)}); "
                   f"{bench['resumed_with_range']} downloads resumed with `Range`; "
                   f"{bench['requests']} requests for {bench['files']} files "
                   f"(healthy: {bench['healthy_requests']}); the cache holds only verified "
                   f"files: {'yes' if bench['cache_intact'] else '**no**'}. The epoch (open + "
                   f"every batch, median of {bench['repeat']}) took {epoch['flaky']:.2f} s "
                   f"against {epoch['healthy']:.2f} s from the same server without faults."])


def pipeline_section(metrics: Path) -> list[str]:
    """The committed run's data wait per training stage and its DVC + start-up overhead."""
    rows = []
    for name in ("pretrain_teacher", "pretrain_baseline", "distill"):
        path = metrics / f"{name}.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        wait = m.get("data_wait_fraction")
        if wait is None:
            continue
        rows.append([name, fmt(m.get("images_per_s"), 0), f"{100 * wait:.1f}%",
                     verdict(wait <= DATA_WAIT_GOAL)])
    lines = []
    if rows:
        lines += (["**Data wait in the default pipeline** (`metrics/*.json` of the committed "
                   "run: time waiting for the batch over the steps' wall time, goal ≤ "
                   f"{100 * DATA_WAIT_GOAL:.0f}%).", ""]
                  + table(["stage", "img/s", "data wait", "goal"], rows) + [""])
    path = metrics / "pipeline.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    if timing.get("one_run"):
        overhead = timing["overhead_seconds"]
        lines += [f"**DVC and start-up overhead of the committed `dvc repro`** "
                  f"(`metrics/pipeline.json`): wall {timing['wall_seconds']:.0f} s − the stages' "
                  f"own {timing['stage_seconds']:.0f} s = {overhead:.0f} s (goal ≤ "
                  f"{OVERHEAD_GOAL_S:.0f} s: {verdict(overhead <= OVERHEAD_GOAL_S)}): "
                  f"{timing['startup_seconds']:.0f} s of process start-up (Python, imports, "
                  f"writing outputs) and {timing['between_stages_seconds']:.0f} s between "
                  f"processes (each process's end after its metrics, DVC hashing and caching, "
                  f"the training stages' launcher)."]
    return lines


def startup_section(bench: Mapping[str, Any]) -> list[str]:
    """`bench/bench_startup.py`: each program's start-up, the floors, the sum over `dvc.lock`."""
    floors = bench["floors_s"]
    rows = []
    warm = bench.get("warm_startup_s")  # runs before the warm start existed have none
    for name, seconds in sorted(bench["startup_s"].items(), key=lambda item: -item[1]):
        top = bench["top_imports"].get(name, [])
        rows.append([f"`{name}`", f"{seconds:.2f}"]
                    + ([f"{warm[name]:.2f}" if name in warm else "–"] if warm else [])
                    + [", ".join(f"{t['package']} {t['seconds']:.2f}" for t in top) or "–"])
    total, removable = bench["sum_startup_s"], bench["removable_by_lazier_imports_s"]
    whole = "" if bench.get("complete", True) else " (**not every stage timed**)"
    # runs before warm_up_runs existed timed the first, cold start too
    untimed = ", after one untimed run of each" if bench.get("warm_up_runs") else ""
    return ([f"**Process start-up** (`bench/bench_startup.py`: median of {bench['repeat']} fresh "
             f"processes to the end of argument parsing, `--help`{untimed}{measured_on(bench)}; "
             f"seconds; *warm*: the same, handed to a `seed_core.warm` server). "
             f"Floors: " + ", ".join(f"{name} {value:.2f}" for name, value in floors.items())
             + ".", ""]
            + table(["program", "start-up"] + (["warm"] if warm else [])
                    + ["slowest top-level imports (cumulative)"], rows)
            + ["", f"Over the {len(bench['stages'])} stages of the committed `dvc.lock`{whole}, "
                   f"the fresh processes they start take {total:.1f} s to reach their work, before "
                   f"DVC's own time between them and the MLflow import of tracked stages; cutting "
                   f"every process to `import torch` would remove {removable:.1f} s of it. Goal "
                   f"for DVC and start-up together: ≤ {bench['overhead_goal_s']:.0f} s; "
                   + ("start-up alone is within it; MLflow (below) and DVC's time add to it."
                      if total <= bench["overhead_goal_s"] else "**missed** by start-up alone.")]
            + mlflow_store_sentence(bench) + warm_sentence(bench) + exit_sentence(bench))


def warm_sentence(bench: Mapping[str, Any]) -> list[str]:
    """The start-up of the stages handed to a warm-start server, as `make demo` starts them."""
    if "warm_startup_s" not in bench:  # runs before the warm start existed
        return []
    floors, warm = bench["floors_s"], bench["warm_floors_s"]
    stages = len(bench["stages"])
    store = mlflow_store_seconds(floors)
    return ["", f"Started warm (`SEED_WARM_START=1`, which `make demo`, `make smoke` and `make "
                f"reproduce` set: `seed_core/warm.py` hands the script to a process forked from "
                f"a server that has imported torch, timm and MLflow), an empty script takes "
                f"{warm['hand-over']:.2f} s from the client's start to its end (python alone: "
                f"{floors['python']:.2f} s), and the stage scripts "
                f"{min(bench['warm_startup_s'].values()):.2f} to "
                f"{max(bench['warm_startup_s'].values()):.2f} s: over the {stages} stages "
                f"{bench['sum_warm_startup_s']:.1f} s instead of {bench['sum_startup_s']:.1f} s. "
                f"A warm stage's tracking opens the store in {warm['mlflow store']:.2f} s instead "
                f"of {store:.2f} s: {stages} × {store - warm['mlflow store']:.2f} = "
                f"{stages * (store - warm['mlflow store']):.1f} s less."]


def exit_sentence(bench: Mapping[str, Any]) -> list[str]:
    """How long a stage's process takes to end after its last line, torn down or not."""
    exits = bench.get("exit_s")
    if not exits:  # runs before the figure existed
        return []
    stages = len(bench["stages"])
    saved = exits["interpreter"] - exits["program.run"]
    return ["", f"After its last line, a process with torch, timm and MLflow imported takes "
                f"{exits['interpreter']:.2f} s to end when the interpreter tears its modules "
                f"down, {exits['program.run']:.2f} s through `seed_core.program.run` (exit "
                f"handlers, then `os._exit`), which every stage script ends with: "
                f"{stages} × {saved:.2f} = {stages * saved:.1f} s less between the stages."]


def mlflow_store_seconds(floors: Mapping[str, float]) -> float:
    """What importing MLflow and opening its store adds to a process that imported torch."""
    return floors["torch + mlflow store"] - floors["import torch"]


def mlflow_store_sentence(bench: Mapping[str, Any]) -> list[str]:
    """What MLflow adds to the start-up above: every stage of the demo is tracked (params.yaml
    exists), and each imports MLflow and opens its store when its tracking starts."""
    floors = bench["floors_s"]
    if "torch + mlflow store" not in floors:  # runs before the floor existed
        return []
    store = mlflow_store_seconds(floors)
    stages = len(bench["stages"])
    return ["", f"Every stage of the demo is tracked: when its tracking starts it imports MLflow "
                f"and opens the SQLite store, {store:.2f} s after torch (`torch + mlflow store` "
                f"− `import torch`), so {stages} × {store:.2f} = {stages * store:.1f} s more."]


def dvc_section(bench: Mapping[str, Any]) -> list[str]:
    """`bench/bench_dvc.py`: DVC's own time in `dvc repro`, beside its stages' processes."""
    stages, own = bench["stage_commands"], bench["dvc_own_s"]
    return [f"**DVC's own time** (`bench/bench_dvc.py`: `dvc repro` of {bench['pipeline']} in a "
            f"scratch copy, {stages} stage commands{measured_on(bench)}): {bench['wall_s']:.1f} s "
            f"in all, {bench['stage_processes_s']:.1f} s of it in the stages' processes (from "
            f"their start to their end) and {own:.1f} s DVC's own ({own / stages:.2f} s per "
            f"stage: checking deps, hashing and caching outputs), of which "
            f"{bench['lock_writes_s']:.1f} s rewriting `dvc.lock` ({bench['lock_lines']:,} "
            f"lines at the end) after each of {bench['lock_writes']} stages."]


def gpu_section(gpu: Mapping[str, Any]) -> list[str]:
    """`bench/gpu_check.sh`'s summary JSON, from a run on a GPU machine."""
    rows = [[name, fmt(case["images_per_s"], 0), fmt(case["reference_images_per_s"], 0),
             f"{case['overhead']:.3f}", f"{case['speedup_vs_reference']:.3f}",
             fmt(case["peak_gpu_mib"], 0)]
            for name, case in gpu["step"].items()]
    distill, knn = gpu["distill"], gpu["knn"]

    def pace(run: Mapping[str, Any]) -> str:
        return ("the loader, not the GPU, sets the pace"
                if run["data_wait_fraction"] > DATA_WAIT_GOAL else "the loader keeps up")

    def where(run: Mapping[str, Any]) -> str:
        # runs before data.colour_on had the colour ops in the loader workers
        return {"device": "colour ops on the GPU", "cpu": "colour ops in the loader workers"}[
            run.get("colour_on", "cpu")]

    runs = [distill] + ([gpu["distill_colour_on_cpu"]] if "distill_colour_on_cpu" in gpu else [])
    speeds = "; ".join(f"{where(run)}: {fmt(run['images_per_s'], 0)} img/s, data wait "
                       f"{100 * run['data_wait_fraction']:.1f}% of the step time ({pace(run)})"
                       for run in runs)
    return ([f"**On a GPU** (`bench/gpu_check.sh`, {gpu['machine']}, torch {gpu['torch']}, "
             f"fp16 AMP; one run, {gpu['seconds']} s in all): the SEED step at ImageNet shapes "
             f"(R-50 → R-18, 224 px, batch 32, K 65,536) and at the default ones.", ""]
            + table(["case", "img/s", "released formulation img/s", "overhead",
                     "speed-up", "peak GPU MiB"], rows)
            + ["", f"The real `distill` stage under torchrun (NCCL), {distill['steps_run']} steps "
                   f"of batch {distill.get('batch', '?')} from {distill.get('images', '?')} with "
                   f"{distill.get('workers', '?')} loader workers, {speeds} (30 steps include "
                   f"the workers' start). kNN with a "
                   f"{knn['bank']:,} × 128 bank and {knn['queries']:,} queries: {knn['seconds']} "
                   f"s, {fmt(knn['peak_extra_mib'], 0)} MiB of GPU memory, exact-neighbour "
                   f"recall {knn['recall_vs_exact']}."])


SECTIONS: list[tuple[str, Callable[[Mapping[str, Any]], list[str]]]] = [
    ("versions", versions_section), ("step", step_section), ("levers", levers_section),
    ("loader", loader_section), ("knn", knn_section), ("linear", linear_section),
    ("shards", shards_section), ("open_shards", open_shards_section),
    ("remote_epoch", remote_epoch_section), ("startup", startup_section), ("dvc", dvc_section),
    ("gpu_check", gpu_section)]


def render(results: Path = RESULTS, metrics: Path = ROOT / "metrics") -> str:
    out: list[str] = []
    machine = load("step", results)
    if machine:
        out += [f"Machine: {machine.get('machine', '?')}, torch {machine.get('torch', '?')}, "
                f"load average {machine.get('load_average_at_start')} when the step benchmark "
                f"started. Each figure is from one run of `make bench`; ratios compare runs "
                f"of the same sitting.", ""]
    out += pipeline_section(metrics) + [""]
    for name, section in SECTIONS:
        data = load(name, results)
        out += (section(data) if data else [f"`bench/bench_{name}.py`: not run yet."]) + [""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readme", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 if the section is stale")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new = splice_section(text, BEGIN, END, render(), str(args.readme))
    if args.check:
        if new != text:
            sys.exit(f"{args.readme}: the performance section is stale: run "
                     f"python bench/render.py {args.readme}")
        return
    if new != text:
        write_text(args.readme, new)


if __name__ == "__main__":
    main()
