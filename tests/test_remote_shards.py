"""Remote shards against a flaky HTTP server (a thread on 127.0.0.1 started by each test): 503s,
connections dropped with and without a Content-Length, a stalled response, corrupted bytes, a
permanently broken shard; and the cache's cap, free-disk check and stale `.part` cleanup.

Every test checks the cache afterwards (only whole, verified files; no `.part` left) and that
the samples read equal the local shards'.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import converted_shards
from seed_core.data import open_shards, steps_per_epoch, train_loader
from seed_core.data.shardset import SampleReader, ShardError, ShardSet, UnverifiedWarning
from seed_core.data.transforms import eval_transform

TIMEOUT_S = 1.0
STALL_S = 3.0  # longer than the client's timeout
RETRIES = 3


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    return converted_shards(tmp_path_factory.mktemp("remote"), [f"k{i}" for i in range(23)],
                            (16, 16), seed=3)


class FlakyServer:
    """Serves the files of `root` (HTTP/1.0, honouring `Range: bytes=N-`), with faults queued
    per file name for its next requests (`faults`) or for all of them (`always`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.always: dict[str, str] = {}
        self.log: list[tuple[str, str | None, str]] = []  # (name, Range header, fault)
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

    def requests(self, name: str) -> list[tuple[str | None, str]]:
        return [(rng, fault) for n, rng, fault in self.log if n == name]

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        name = handler.path.lstrip("/")
        queued = self.faults[name]
        fault = self.always.get(name) or (queued.popleft() if queued else "ok")
        asked = handler.headers.get("Range")
        self.log.append((name, asked, fault))
        path = self.root / name
        if fault == "404" or not path.is_file():
            handler.send_error(404)
            return
        if fault == "503":
            handler.send_error(503, "busy")
            return
        if fault == "stall":
            time.sleep(STALL_S)
        data = path.read_bytes()
        start = int(asked[len("bytes="):].split("-")[0]) if asked else 0
        body = data[start:]
        if fault == "corrupt":
            body = body[:5] + bytes([body[5] ^ 0xFF]) + body[6:]
        try:
            handler.send_response(206 if start else 200)
            if start:
                handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            if fault != "drop-nolength":
                handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if fault in ("drop", "drop-nolength"):
                body = body[:len(body) // 2]  # then the connection closes (HTTP/1.0)
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (stall)
            pass

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server(local, tmp_path, monkeypatch):
    monkeypatch.setenv("SEED_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SEED_FETCH_RETRIES", str(RETRIES))
    monkeypatch.setenv("SEED_FETCH_BACKOFF_S", "0.01")
    monkeypatch.setenv("SEED_FETCH_TIMEOUT_S", str(TIMEOUT_S))
    monkeypatch.delenv("SEED_SHARD_CACHE_MAX_BYTES", raising=False)
    flaky = FlakyServer(local)
    yield flaky
    flaky.stop()


def assert_cache_intact(remote: ShardSet, local: Path) -> None:
    """Only whole files in the cache, each equal to the served one; no `.part` left."""
    files = [p for p in remote.cache_dir.iterdir() if not p.name.endswith(".lock")]
    assert not [p.name for p in files if p.name.endswith(".part")]
    for path in files:
        assert path.read_bytes() == (local / path.name).read_bytes(), path.name


def assert_same_samples(remote: ShardSet, local: Path) -> None:
    near = open_shards(local)
    assert remote.index.keys.tolist() == near.index.keys.tolist()
    assert remote.index.labels.tolist() == near.index.labels.tolist()
    far_reader, near_reader = SampleReader(remote), SampleReader(near)
    assert all(far_reader.read(i) == near_reader.read(i) for i in range(near.samples))


def size_of(local: Path, name: str) -> int:
    return (local / name).stat().st_size


def test_503s_are_retried(server, local) -> None:
    server.faults["shard-000001.tar"].extend(["503", "503"])
    server.faults["manifest.json"].append("503")
    remote = open_shards(server.url)
    assert_same_samples(remote, local)
    assert [f for _, f in server.requests("shard-000001.tar")] == ["503", "503", "ok"]
    assert_cache_intact(remote, local)


def test_a_connection_dropped_mid_body_resumes_with_range(server, local) -> None:
    server.faults["shard-000000.tar"].append("drop")  # a short body under a Content-Length
    remote = open_shards(server.url)
    assert_same_samples(remote, local)
    half = size_of(local, "shard-000000.tar") // 2
    assert server.requests("shard-000000.tar") == [(None, "drop"), (f"bytes={half}-", "ok")]
    assert_cache_intact(remote, local)


def test_a_drop_without_content_length_is_caught_by_the_manifest_size(server, local) -> None:
    # close-delimited: the client sees a clean end of a short body; only the size tells
    server.faults["shard-000002.tar"].append("drop-nolength")
    server.faults["index.bin"].append("drop-nolength")
    remote = open_shards(server.url)
    assert_same_samples(remote, local)
    for name in ("shard-000002.tar", "index.bin"):
        half = size_of(local, name) // 2
        assert server.requests(name) == [(None, "drop-nolength"), (f"bytes={half}-", "ok")]
    assert_cache_intact(remote, local)


def old_manifest_copy(local: Path, old: Path) -> Path:
    """A copy of the shards with the manifest an older converter wrote: no sizes, no hashes,
    a sidecar index per shard."""
    shutil.copytree(local, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["bytes"], shard["sha256"]
    (old / manifest.pop("index")["name"]).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old


def test_a_drop_under_a_content_length_resumes_without_a_manifest_size(server, local,
                                                                        tmp_path) -> None:
    # nothing but the Content-Length tells a short body here: caching it would lose samples
    server.root = old_manifest_copy(local, tmp_path / "old")
    server.faults["shard-000000.tar"].append("drop")
    with pytest.warns(UnverifiedWarning):
        remote = open_shards(server.url)
    assert_same_samples(remote, local)
    half = size_of(local, "shard-000000.tar") // 2
    assert server.requests("shard-000000.tar") == [(None, "drop"), (f"bytes={half}-", "ok")]
    assert_cache_intact(remote, server.root)


def test_a_manifest_cut_short_is_fetched_again(server, local) -> None:
    # with a Content-Length: resumed; without one: the JSON is invalid, so fetched whole again
    server.faults["manifest.json"].extend(["drop", "drop-nolength"])
    remote = open_shards(server.url)
    assert_same_samples(remote, local)
    half = size_of(local, "manifest.json") // 2
    assert server.requests("manifest.json") == [(None, "drop"), (f"bytes={half}-",
                                                                 "drop-nolength"), (None, "ok")]
    assert_cache_intact(remote, local)


def test_a_manifest_never_fetched_whole_is_an_error_naming_its_url(server) -> None:
    server.always["manifest.json"] = "drop-nolength"
    with pytest.raises(ShardError, match=rf"{server.url}manifest.json: cannot read it intact "
                                         rf"after {RETRIES + 1} attempt\(s\) \(last: not valid "
                                         rf"JSON .*cut short by the network"):
        open_shards(server.url)
    assert len(server.requests("manifest.json")) == RETRIES + 1


def test_a_stalled_response_times_out_and_is_retried(server, local) -> None:
    server.faults["shard-000001.tar"].append("stall")
    remote = open_shards(server.url)
    start = time.perf_counter()
    assert_same_samples(remote, local)
    assert time.perf_counter() - start < STALL_S  # the timeout cut the stall short
    assert [f for _, f in server.requests("shard-000001.tar")] == ["stall", "ok"]
    assert_cache_intact(remote, local)


def test_corrupted_bytes_are_never_renamed_into_the_cache(server, local) -> None:
    server.faults["shard-000000.tar"].append("corrupt")  # once: refetched whole, then fine
    server.always["shard-000002.tar"] = "corrupt"
    remote = open_shards(server.url)
    reader = SampleReader(remote)
    near = SampleReader(open_shards(local))
    assert all(reader.read(i) == near.read(i) for i in range(20))
    assert server.requests("shard-000000.tar") == [(None, "corrupt"), (None, "ok")]
    with pytest.raises(ShardError, match=r"shard-000002.tar: not fetched intact.*sha256"):
        reader.read(22)
    assert len(server.requests("shard-000002.tar")) == RETRIES + 1
    assert not (remote.cache_dir / "shard-000002.tar").exists()
    assert_cache_intact(remote, local)


def test_a_broken_shard_is_an_error_naming_it_and_its_url(server, local) -> None:
    server.always["shard-000001.tar"] = "drop-nolength"
    remote = open_shards(server.url)
    url = f"{server.url}shard-000001.tar"
    with pytest.raises(ShardError) as raised:
        # the loader replaces unreadable samples; a shard that cannot be fetched is not that
        list(train_loader(remote, eval_transform(8), 4, seed=0, epoch=0, rank=0, world_size=1,
                          steps=steps_per_epoch(remote, 4), workers=0))
    message = str(raised.value)
    assert "shard-000001.tar: not fetched intact" in message and url in message
    assert f"after {RETRIES + 1} attempt(s)" in message and "cut short" in message
    assert len(server.requests("shard-000001.tar")) == RETRIES + 1  # bounded
    assert not (remote.cache_dir / "shard-000001.tar").exists()
    assert_cache_intact(remote, local)


def test_a_missing_shard_fails_at_once(server, local) -> None:
    server.always["shard-000002.tar"] = "404"  # not a network fault: retrying cannot help
    remote = open_shards(server.url)
    with pytest.raises(ShardError, match=rf"shard-000002.tar: .*{server.url}shard-000002.tar: "
                                         rf"cannot read it \(HTTP 404"):
        remote.shard_path(2)
    assert len(server.requests("shard-000002.tar")) == 1
    assert_cache_intact(remote, local)


def test_the_cache_cap_evicts_the_least_recently_used_files(server, local, monkeypatch) -> None:
    remote = open_shards(server.url)
    reader = SampleReader(remote)
    reader.read(0), reader.read(10)  # index.bin, shard 0, shard 1
    cache = remote.cache_dir
    now = time.time()
    for name, age in (("index.bin", 100), ("shard-000000.tar", 300), ("shard-000001.tar", 200)):
        os.utime(cache / name, (now - age, now - age))
    sizes = {n: size_of(local, n) for n in ("index.bin", "shard-000001.tar", "shard-000002.tar")}
    monkeypatch.setenv("SEED_SHARD_CACHE_MAX_BYTES", str(sum(sizes.values())))
    reader.read(22)  # shard 2 needs room: shard 0, the least recently used, goes
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == sorted(
        sizes)
    assert reader.read(0) == SampleReader(open_shards(local)).read(0)  # an open file stays valid
    assert_same_samples(remote, local)  # shard 0 fetched again
    assert_cache_intact(remote, local)


def test_a_full_disk_is_an_error_naming_the_cache_and_the_bytes(server, local,
                                                                monkeypatch) -> None:
    remote = open_shards(server.url)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    needed = size_of(local, "shard-000000.tar")
    with pytest.raises(ShardError, match=rf"{remote.cache_dir}: shard-000000.tar needs "
                                         rf"{needed:,} bytes, the disk has 1,000 free.*"
                                         rf"SEED_SHARD_CACHE"):
        remote.shard_path(0)
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert_same_samples(remote, local)
    assert_cache_intact(remote, local)


def test_stale_parts_are_removed_and_a_killed_download_resumes(server, local) -> None:
    cache = open_shards(server.url).cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    data = (local / "shard-000000.tar").read_bytes()
    (cache / "shard-000000.tar.part").write_bytes(data[:1000])  # a download killed just now
    stale = cache / ".shard-000001.tar.x1y2.part"  # of an old version, killed hours ago
    stale.write_bytes(b"junk")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    remote = open_shards(server.url)
    assert not stale.exists()
    assert_same_samples(remote, local)
    assert server.requests("shard-000000.tar") == [("bytes=1000-", "ok")]
    assert_cache_intact(remote, local)


def test_an_old_manifest_opens_with_a_warning(server, local, tmp_path) -> None:
    old = server.root = old_manifest_copy(local, tmp_path / "old")
    with pytest.warns(UnverifiedWarning, match=r"manifest.json: 3 file\(s\).*cannot be verified"):
        remote = open_shards(server.url)
    assert_same_samples(remote, local)
    assert_cache_intact(remote, old)
