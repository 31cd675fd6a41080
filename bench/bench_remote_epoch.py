"""Benchmark of one training epoch read over HTTP from a flaky server; prints one JSON object.

Writes a small real shard set with the project's converter (`convert_tsv_to_shards`, from a TSV
of generated JPEGs: `--shards` shards of `--shard-samples` samples, labels `i % 10`), serves it
from an HTTP/1.0 server thread on 127.0.0.1 and reads one full epoch through the real
`open_shards(url)` and `train_loader` (world size 1, `--workers` loader workers, batches that
divide the set, so the epoch reads every sample once), with `SEED_SHARD_CACHE` in a temporary
directory (a fresh one per run: every file is downloaded in every run) and the fetch knobs set
through their environment variables (`SEED_FETCH_TIMEOUT_S`, `SEED_FETCH_RETRIES`,
`SEED_FETCH_BACKOFF_S`).

The flaky server injects, on a schedule drawn from `--seed` (the first requests of randomly
chosen files), 503s (one file gets two in a row), a connection dropped half-way through the body
with a Content-Length (a short body, resumed with `Range`) and one without (a clean, short,
close-delimited body that only the manifest's size catches), a response stalled longer than the
timeout (retried), and one delayed less than the timeout (`slow`: it must *not* be retried).
`manifest.json`, whose size the client cannot know, is always cut short twice first: once under
a Content-Length, once without (invalid JSON: fetched whole again). Each run alternates with a run against the same server without faults (`--repeat` pairs; medians).

Reported: the samples read against the manifest's count, by key (lost, duplicated, unexpected,
wrong label, replaced as unreadable: all must be zero), the faults injected by kind, the retries
observed in the server's request log (a faulted request followed by another request for the
same file) and the resumes (`Range` requests), whether the cache holds only whole copies of the
served files, and the epoch's wall time (open + every batch) flaky and healthy. The process
exits 1 (after printing the JSON, with `"ok": false` and the error) if any sample is lost,
duplicated or wrong, or the epoch fails.

`--break-shard N --break-kind corrupt|truncate` serves shard N corrupted (one byte flipped) or
truncated (the server's copy cut in half) on every request: the fetch code must refuse it, so
the epoch fails and the report says so (the test of this benchmark's failure path).

    python bench/bench_remote_epoch.py [--shards 20 --shard-samples 20 --batch 20 --workers 1
                                        --timeout 1.0 --repeat 3]
"""

from __future__ import annotations

import argparse
import collections
import gc
import io
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from seed_core.data import open_shards, steps_per_epoch, train_loader
from seed_core.data.convert import convert_tsv_to_shards
from seed_core.data.transforms import eval_transform
from seed_core.data.tsv import write_tsv

from machine import cpu_name

RETRYING_FAULTS = ("503", "drop", "drop-nolength", "stall")  # each must be retried
FAULTS = (*RETRYING_FAULTS, "slow")  # slow: delayed less than the timeout, not retried
BREAK_KINDS = ("corrupt", "truncate")


# ------------------------------------------------------------------ the data


def jpeg_rows(count: int, side: int, seed: int):
    """`(key, label, JPEG bytes)`: smooth random images, label `i % 10`."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        small = rng.integers(0, 256, (max(2, side // 8), max(2, side // 8), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((side, side), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        yield f"n{i % 10:08d}/img_{i:06d}.JPEG", i % 10, buffer.getvalue()


def make_shards(root: Path, shards: int, per_shard: int, side: int, seed: int) -> dict[str, int]:
    """The shard set under `root / "shards"`; returns the expected `{key: label}`."""
    rows = list(jpeg_rows(shards * per_shard, side, seed))
    write_tsv(root / "train.tsv", rows)
    convert_tsv_to_shards(root / "train.tsv", root / "shards", shard_size=per_shard, workers=1,
                          shuffle_seed=seed)
    return {key: label for key, label, _ in rows}


# ------------------------------------------------------------------ the server


class FlakyServer:
    """Serves the files of `root` over HTTP/1.0 (honouring `Range: bytes=N-`), with faults
    queued per file name for its next requests (`faults`) or for every request (`always`);
    logs `(name, Range header, fault)` per request."""

    def __init__(self, root: Path, timeout_s: float) -> None:
        self.root = root
        self.stall_s, self.slow_s = 2.5 * timeout_s, 0.3 * timeout_s
        self.faults: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.always: dict[str, str] = {}
        self.log: list[tuple[str, str | None, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        name = handler.path.lstrip("/")
        queued = self.faults[name]
        fault = self.always.get(name) or (queued.popleft() if queued else "ok")
        asked = handler.headers.get("Range")
        self.log.append((name, asked, fault))
        path = self.root / name
        try:
            if not path.is_file():
                handler.send_error(404)
                return
            if fault == "503":
                handler.send_error(503, "busy")
                return
            if fault in ("stall", "slow"):
                time.sleep(self.stall_s if fault == "stall" else self.slow_s)
            data = path.read_bytes()
            if fault == "truncate":  # the server's copy itself is cut short
                data = data[:len(data) // 2]
            start = int(asked[len("bytes="):].split("-")[0]) if asked else 0
            if start and start >= len(data):
                handler.send_error(416)
                return
            body = data[start:]
            if fault == "corrupt":
                body = body[:5] + bytes([body[5] ^ 0xFF]) + body[6:]
            handler.send_response(206 if start else 200)
            if start:
                handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            if fault != "drop-nolength":
                handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if fault in ("drop", "drop-nolength"):
                body = body[:len(body) // 2]  # then the connection closes (HTTP/1.0)
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a stall)
            pass

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def fault_schedule(names: list[str], seed: int) -> dict[str, list[str]]:
    """Faults for the first requests of files: `manifest.json` cut short with and without a
    Content-Length, then, on other files drawn with `seed`, three 503s (two in a row on one
    file) and one of each other kind, spread so that no file gets more than two."""
    rng = random.Random(seed)
    schedule: dict[str, list[str]] = collections.defaultdict(list)
    others = [n for n in names if n != "manifest.json"]  # 3 attempts (--retries 2) suffice
    if len(others) < len(names):
        schedule["manifest.json"] += ["drop", "drop-nolength"]
    twice = rng.choice(others)
    schedule[twice] += ["503", "503"]
    # spread over the other files, so that no file needs more than 3 attempts (--retries 2)
    rest = rng.sample([n for n in others if n != twice] or [twice], k=len(others) - 1 or 1)
    for i, fault in enumerate(("503", "drop", "drop-nolength", "stall", "slow")):
        schedule[rest[i % len(rest)]].append(fault)
    return dict(sorted(schedule.items()))


def read_log(log: list[tuple[str, str | None, str]]) -> dict:
    """Faults served by kind, retries after them (a later request for the same file), resumes
    (requests with a Range header) and retries after a fault-free response."""
    faults: collections.Counter = collections.Counter()
    retried: collections.Counter = collections.Counter()
    unscheduled = 0
    for i, (name, _, fault) in enumerate(log):
        again = any(later == name for later, _, _ in log[i + 1:])
        if fault != "ok":
            faults[fault] += 1
            retried[fault] += again
        elif again:
            unscheduled += 1  # e.g. a timeout on a loaded machine, or a re-fetch
    return {"requests": len(log), "files": len({name for name, _, _ in log}),
            "faults_injected": dict(sorted(faults.items())),
            "retries_observed": dict(sorted(retried.items())),
            "resumed_with_range": sum(1 for _, asked, _ in log if asked),
            "retries_after_ok": unscheduled}


# ------------------------------------------------------------------ one epoch


def cache_intact(cache: Path, served: Path) -> bool:
    """Only whole files in the cache, each equal to the served one; no `.part` left."""
    files = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    return all(not p.name.endswith(".part") and p.read_bytes() == (served / p.name).read_bytes()
               for p in files)


def one_epoch(server: FlakyServer, cache: Path, expected: dict[str, int], args) -> dict:
    """Open the shards at the server's URL and read one epoch; the keys seen, checked."""
    os.environ["SEED_SHARD_CACHE"] = str(cache)
    seen: collections.Counter = collections.Counter()
    wrong, replaced, error = 0, 0, None
    start = time.perf_counter()
    try:
        shards = open_shards(server.url)
        steps = steps_per_epoch(shards, args.batch)
        for batch in train_loader(shards, eval_transform(args.side), args.batch, seed=0, epoch=0,
                                  rank=0, world_size=1, steps=steps, workers=args.workers,
                                  timeout=args.loader_timeout):
            seen.update(batch["key"])
            replaced += len(batch["bad"])
            wrong += sum(expected.get(key) != int(label)
                         for key, label in zip(batch["key"], batch["label"].tolist()))
    except Exception as err:  # noqa: BLE001  (reported, then exit 1)
        message = str(err).strip()
        if "Original Traceback" in message:  # raised in a loader worker: its last line
            message = message.splitlines()[-1]
        error = message if message.startswith(type(err).__module__) else (
            f"{type(err).__name__}: {message}")
        if args.verbose:
            traceback.print_exc()
    seconds = time.perf_counter() - start
    # a failed loader's iterator sits in reference cycles (the exception's frames): collect it
    # now, so its workers are shut down before the server stops (a forked worker still holds
    # the listening socket, so its retries would time out instead of being refused)
    gc.collect()
    manifest = json.loads((server.root / "manifest.json").read_text())
    return {"epoch_s": seconds, "samples_read": sum(seen.values()),
            "manifest_samples": manifest["samples"],
            "lost": len(set(expected) - set(seen)),
            "duplicated": sum(count - 1 for count in seen.values() if count > 1),
            "unexpected": len(set(seen) - set(expected)), "wrong_labels": wrong,
            "replaced_unreadable": replaced, "cache_intact": cache_intact(cache, server.root),
            "error": error, **read_log(server.log)}


def intact(run: dict) -> bool:
    return (run["error"] is None and run["samples_read"] == run["manifest_samples"]
            and not (run["lost"] or run["duplicated"] or run["unexpected"] or run["wrong_labels"]
                     or run["replaced_unreadable"]) and run["cache_intact"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--shard-samples", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20, help="must divide the samples")
    parser.add_argument("--side", type=int, default=32, help="image side (and eval crop)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1.0,
                        help="SEED_FETCH_TIMEOUT_S; the stall is 2.5x it, the slow reply 0.3x")
    parser.add_argument("--retries", type=int, default=5, help="SEED_FETCH_RETRIES")
    parser.add_argument("--backoff", type=float, default=0.05, help="SEED_FETCH_BACKOFF_S")
    parser.add_argument("--loader-timeout", type=float, default=120.0,
                        help="train_loader's wait for one batch (with workers)")
    parser.add_argument("--repeat", type=int, default=3, help="flaky/healthy pairs")
    parser.add_argument("--seed", type=int, default=0, help="data and fault schedule")
    parser.add_argument("--break-shard", type=int, default=None,
                        help="serve this shard broken on every request (the epoch must fail)")
    parser.add_argument("--break-kind", choices=BREAK_KINDS, default="corrupt")
    parser.add_argument("--verbose", action="store_true", help="tracebacks of failed epochs")
    args = parser.parse_args(argv)
    samples = args.shards * args.shard_samples
    if args.repeat < 1 or args.shards < 1 or args.shard_samples < 1 or samples % args.batch:
        parser.error(f"need --repeat >= 1 and a --batch dividing the {samples} samples")
    if args.break_shard is not None and not 0 <= args.break_shard < args.shards:
        parser.error(f"--break-shard must be in [0, {args.shards})")

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    knobs = {"SEED_FETCH_TIMEOUT_S": str(args.timeout), "SEED_FETCH_RETRIES": str(args.retries),
             "SEED_FETCH_BACKOFF_S": str(args.backoff)}
    saved = {name: os.environ.get(name) for name in [*knobs, "SEED_SHARD_CACHE",
                                                     "SEED_SHARD_CACHE_MAX_BYTES"]}
    os.environ.update(knobs)
    os.environ.pop("SEED_SHARD_CACHE_MAX_BYTES", None)
    flaky_runs, healthy_runs = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_remote_epoch_") as tmp:
            root = Path(tmp)
            expected = make_shards(root, args.shards, args.shard_samples, args.side, args.seed)
            served = root / "shards"
            names = ["manifest.json", "index.bin",
                     *(s["name"] for s in json.loads((served / "manifest.json").read_text())
                       ["shards"])]
            schedule = fault_schedule(names, args.seed)
            shard_bytes = sum((served / n).stat().st_size for n in names)
            for r in range(args.repeat):
                flaky = FlakyServer(served, args.timeout)
                for name, faults in schedule.items():
                    flaky.faults[name].extend(faults)
                if args.break_shard is not None:
                    flaky.always[names[2 + args.break_shard]] = args.break_kind
                try:
                    run = one_epoch(flaky, root / f"cache-flaky-{r}", expected, args)
                finally:
                    flaky.stop()
                run["unserved_faults"] = sum(len(q) for q in flaky.faults.values())
                flaky_runs.append(run)
                if not intact(run):
                    break
                healthy = FlakyServer(served, args.timeout)
                try:
                    healthy_runs.append(one_epoch(healthy, root / f"cache-healthy-{r}",
                                                  expected, args))
                finally:
                    healthy.stop()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    ok = all(intact(run) for run in flaky_runs + healthy_runs) and len(flaky_runs) == args.repeat
    first = next((run for run in flaky_runs if not intact(run)), flaky_runs[0])
    report = {
        "benchmark": "remote_epoch", "ok": ok,
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "python": sys.version.split()[0],
        "load_average_at_start": load_at_start,
        "shards": args.shards, "samples": samples, "shard_samples": args.shard_samples,
        "served_kib": round(shard_bytes / 1024, 1), "image_side": args.side,
        "batch": args.batch, "workers": args.workers, "repeat": args.repeat,
        "fetch_env": knobs, "stall_s": round(2.5 * args.timeout, 3),
        "slow_s": round(0.3 * args.timeout, 3),
        "schedule": schedule,
        **({"broken": {"shard": names[2 + args.break_shard], "kind": args.break_kind}}
           if args.break_shard is not None else {}),
        # the (first failed, else the first) flaky run's checks and request log
        **{key: first[key] for key in (
            "samples_read", "manifest_samples", "lost", "duplicated", "unexpected",
            "wrong_labels", "replaced_unreadable", "cache_intact", "error", "faults_injected",
            "retries_observed", "resumed_with_range", "retries_after_ok", "unserved_faults",
            "requests", "files")},
        "healthy_requests": healthy_runs[0]["requests"] if healthy_runs else None,
        "healthy_retries_after_ok": (max(run["retries_after_ok"] for run in healthy_runs)
                                     if healthy_runs else None),
        "epoch_s": {"flaky": [round(run["epoch_s"], 3) for run in flaky_runs],
                    "healthy": [round(run["epoch_s"], 3) for run in healthy_runs]},
    }
    if ok:
        flaky_s = statistics.median(run["epoch_s"] for run in flaky_runs)
        healthy_s = statistics.median(run["epoch_s"] for run in healthy_runs)
        report["epoch_s_median"] = {"flaky": round(flaky_s, 3), "healthy": round(healthy_s, 3)}
        report["flaky_minus_healthy_s"] = round(flaky_s - healthy_s, 3)
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
