"""The data benchmarks (`bench/bench_open_shards.py`, `bench/bench_remote_epoch.py`) at tiny sizes:
their JSON says what they measured, and the remote epoch fails loudly, not silently or by
hanging, when a shard cannot be fetched intact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_open_shards  # noqa: E402  (bench/ is not a package)
import bench_remote_epoch  # noqa: E402

HANG_S = 90  # far above a run here (seconds): a hang fails the test instead of blocking it


def run(script: str, *args: str) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_S)
    return done.returncode, json.loads(done.stdout), done.stderr


def test_imagenet_counts_are_1000_full_shards_and_one_short() -> None:
    counts = bench_open_shards.shard_counts(1_281_167, 1_001)
    assert counts[:-1] == [1_280] * 1_000 and counts[-1] == 1_167
    assert bench_open_shards.shard_counts(2_000, 20) == [100] * 20
    uneven = bench_open_shards.shard_counts(1_000, 7)
    assert len(uneven) == 7 and sum(uneven) == 1_000


def test_open_shards_opens_the_synthetic_total() -> None:
    code, report, stderr = run("bench_open_shards.py", "--shards", "20", "--samples", "2000",
                               "--repeat", "1")
    assert code == 0, stderr
    assert report["benchmark"] == "open_shards"
    assert report["samples"] == report["opened_samples"] == 2_000 and report["shards"] == 20
    assert report["steps_per_epoch"] == 2_000 // 256
    assert set(report["seconds_median"]) == set(bench_open_shards.TIMES)
    assert all(seconds >= 0 for seconds in report["seconds_median"].values())
    assert report["peak_rss_growth_mib_median"] >= 0 and report["open_files_delta"] >= 0


@pytest.mark.parametrize("seed", range(5))
def test_the_fault_schedule_is_seeded_and_covers_every_kind(seed: int) -> None:
    names = ["manifest.json", "index.bin", *(f"shard-{i:06d}.tar" for i in range(4))]
    schedule = bench_remote_epoch.fault_schedule(names, seed)
    assert schedule == bench_remote_epoch.fault_schedule(names, seed)
    served = sorted(f for faults in schedule.values() for f in faults)
    assert served == sorted(["503"] * 3 + ["drop", "drop-nolength"] * 2 + ["stall", "slow"])
    # the manifest has no size to check: both of its cut bodies must be caught without one
    assert schedule["manifest.json"] == ["drop", "drop-nolength"]
    assert max(len(faults) for faults in schedule.values()) == 2  # 3 attempts suffice


def test_a_remote_epoch_reads_every_sample_once_through_the_faults() -> None:
    code, report, stderr = run("bench_remote_epoch.py", "--shards", "4", "--repeat", "1",
                               "--timeout", "1.0", "--backoff", "0.01")
    assert code == 0, stderr
    assert report["ok"] and report["error"] is None
    assert report["samples_read"] == report["manifest_samples"] == report["samples"] == 80
    assert report["lost"] == report["duplicated"] == report["unexpected"] == 0
    assert report["wrong_labels"] == report["replaced_unreadable"] == 0
    assert report["cache_intact"] and report["unserved_faults"] == 0
    for kind in bench_remote_epoch.RETRYING_FAULTS:
        assert report["faults_injected"][kind] >= 1
        assert report["retries_observed"][kind] >= 1, kind
    assert report["faults_injected"]["slow"] == 1 and report["retries_observed"]["slow"] == 0
    assert report["resumed_with_range"] >= 2  # both dropped bodies resumed where they stopped
    assert report["requests"] > report["healthy_requests"] == report["files"]
    epoch = report["epoch_s_median"]
    assert epoch["flaky"] > epoch["healthy"] > 0


# corrupt: raised in a loader worker (torch then waits up to 5 s for it to stop); truncate: in
# the main process
@pytest.mark.parametrize("kind, workers", [("corrupt", 1), ("truncate", 0)])
def test_a_shard_that_cannot_be_fetched_fails_the_benchmark(kind: str, workers: int) -> None:
    code, report, stderr = run("bench_remote_epoch.py", "--shards", "4", "--repeat", "1",
                               "--timeout", "1.0", "--backoff", "0.01", "--retries", "2",
                               "--workers", str(workers), "--break-shard", "1",
                               "--break-kind", kind)
    assert code == 1, stderr
    assert not report["ok"] and report["broken"] == {"shard": "shard-000001.tar", "kind": kind}
    assert report["lost"] > 0 and report["samples_read"] < report["manifest_samples"]
    assert "shard-000001.tar: not fetched intact" in report["error"]
    assert "after 3 attempt(s)" in report["error"]
    assert report["faults_injected"][kind] >= 3  # bounded retries, then refused
    assert report["cache_intact"]  # nothing broken was renamed into the cache
    assert "epoch_s_median" not in report
