"""Shard sets: manifest checks, the sample index (consolidated, old sidecars, or scanned), unsafe
tar members, and shards read from URLs (a real http.server on 127.0.0.1, `pipe:` commands,
fsspec). Faults of the network are in test_remote_shards.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import converted_shards, free_port, png_bytes
from seed_core.data import open_shards, train_loader
from seed_core.data.convert import convert_tsv_to_shards
from seed_core.data.shardset import (INDEX_NAME, INDEX_SUFFIX, MAX_MEMBER_BYTES, SampleReader,
                                     SampleReadError, ShardError, scan_shard)
from seed_core.data.transforms import eval_transform
from seed_core.data.tsv import write_tsv


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return converted_shards(tmp_path_factory.mktemp("converted"),
                            [f"dir/x.{i}.png" for i in range(23)], (9, 7), seed=1)


def copy_dir(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def test_consolidated_index_equals_a_scan_of_the_tars(converted) -> None:
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["index"]["name"] == INDEX_NAME and not list(converted.glob("*" + INDEX_SUFFIX))
    shards = open_shards(converted)
    for i, name in enumerate(shards.names):
        consolidated = shards.shard_index(i)
        scanned = scan_shard(converted / name)
        assert consolidated.keys == scanned.keys
        for column in ("labels", "offsets", "sizes"):
            assert np.array_equal(getattr(consolidated, column), getattr(scanned, column))
    index = shards.index
    # memory-mapped: the arrays are views of the file's pages, not copies
    assert all(isinstance(getattr(index, c), np.memmap)
               for c in ("shard", "offsets", "sizes", "labels", "keys"))
    assert index.shard.tolist() == [0] * 10 + [1] * 10 + [2] * 3
    assert index.key(0) == scan_shard(converted / shards.names[0]).keys[0]
    reader = SampleReader(shards)
    assert reader.read(4)[:8] == b"\x89PNG\r\n\x1a\n"


def old_layout(converted: Path, root: Path, sidecars: bool) -> Path:
    """A copy of `converted` as older converters wrote it: no index.bin and no sizes or
    hashes in the manifest; one `.idx.json` sidecar per shard, or none."""
    old = copy_dir(converted, root)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / manifest.pop("index")["name"]).unlink()
    for shard in manifest["shards"]:
        del shard["bytes"], shard["sha256"]
        if sidecars:
            scanned = scan_shard(old / shard["name"])
            shard["index"] = shard["name"] + INDEX_SUFFIX
            (old / shard["index"]).write_text(json.dumps(scanned.to_json(["png"] * len(
                scanned.keys))))
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old


@pytest.mark.parametrize("sidecars", [True, False], ids=["sidecars", "scanned"])
def test_old_layouts_still_open(converted, tmp_path, sidecars) -> None:
    old = open_shards(old_layout(converted, tmp_path / "old", sidecars))
    new = open_shards(converted)
    for column in ("shard", "offsets", "sizes", "labels", "keys"):
        assert getattr(old.index, column).tolist() == getattr(new.index, column).tolist()
    assert SampleReader(old).read(7) == SampleReader(new).read(7)


def test_a_consolidated_index_that_disagrees_is_refused(converted, tmp_path) -> None:
    root = copy_dir(converted, tmp_path / "s")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["samples"] -= 1
    manifest["shards"][1]["samples"] += 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="shard-000000.tar: holds 10 samples in .*index.bin, "
                                         "the manifest says 9"):
        open_shards(root).index
    (root / INDEX_NAME).write_bytes((converted / INDEX_NAME).read_bytes()[:-100])
    with pytest.raises(ShardError, match="index.bin: column .* outside the file"):
        open_shards(root).index


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("shards"), "'shards' is missing or not a list"),
    (lambda m: m.update(samples=999), "the shards hold 23 samples, 'samples' says 999"),
    (lambda m: m.update(shards=[], samples=0), "no samples"),
    (lambda m: m.update(num_classes=0), "'num_classes' must be >= 1"),
    (lambda m: m.update(class_names=["a"]), "1 class_names for num_classes 3"),
    (lambda m: m["shards"][0].update(name="../evil.tar"), "must be a plain file name"),
])
def test_bad_manifests_are_refused_naming_the_problem(converted, tmp_path, change,
                                                       message) -> None:
    root = copy_dir(converted, tmp_path / "s")
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=message):
        open_shards(root)


def test_missing_manifest_or_shard_names_the_fix(converted, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest.json: no shard manifest.*shards.py"):
        open_shards(tmp_path)
    root = copy_dir(converted, tmp_path / "s")
    (root / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: \['shard-000001.tar'\]"):
        open_shards(root)


def test_labels_outside_the_classes_are_refused(converted, tmp_path) -> None:
    root = copy_dir(converted, tmp_path / "s")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["num_classes"] = 2
    manifest.pop("class_counts")
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"has label 2, outside the manifest's 2 classes"):
        open_shards(root).index


def test_a_truncated_shard_reads_short_and_is_named(converted, tmp_path) -> None:
    root = copy_dir(converted, tmp_path / "s")
    shard = root / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1200])
    shards = open_shards(root)
    reader = SampleReader(shards)
    last = shards.samples - 1
    with pytest.raises(SampleReadError, match="shard-000002.tar: sample .* cut short"):
        reader.read(last)


def unsafe_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tar:
        image = png_bytes(np.zeros((4, 4), np.uint8))
        for name, payload in (("ok.png", image), ("ok.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("name, kind, message", [
    ("/etc/evil.png", tarfile.REGTYPE, "absolute or '..' path"),
    ("../evil.png", tarfile.REGTYPE, "absolute or '..' path"),
    ("link.png", tarfile.SYMTYPE, "not a regular file"),
])
def test_unsafe_tar_members_are_refused(tmp_path, name, kind, message) -> None:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
    with pytest.raises(ShardError, match=message):
        scan_shard(unsafe_tar(tmp_path / "s.tar", member))


def test_oversize_members_are_refused_without_reading_them(tmp_path) -> None:
    member = tarfile.TarInfo("huge.png")
    member.size = 4096
    with pytest.raises(ShardError, match="4,096 bytes, more than the 1,024 allowed"):
        scan_shard(unsafe_tar(tmp_path / "s.tar", member, b"\0" * 4096), max_member_bytes=1024)
    assert MAX_MEMBER_BYTES >= 16 << 20  # room for any real photo


# --- remote locations -----------------------------------------------------------------------

@pytest.fixture
def http_shards(converted, tmp_path, monkeypatch):
    """The converted shards served by `python -m http.server` on 127.0.0.1."""
    monkeypatch.setenv("SEED_SHARD_CACHE", str(tmp_path / "cache"))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                               "127.0.0.1", "--directory", str(converted)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 20
    while True:
        try:
            urllib.request.urlopen(url + "manifest.json", timeout=1)
            break
        except OSError:
            if time.time() > deadline:
                server.kill()
                pytest.fail("http.server did not start")
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=10)


def test_training_from_shards_served_over_http(http_shards, converted, tmp_path) -> None:
    remote = open_shards(http_shards)
    local = open_shards(converted)
    assert remote.samples == 23 and remote.names == local.names
    batches = [list(train_loader(shards, eval_transform(8), 4, seed=0, epoch=1, rank=0,
                                 world_size=1, steps=5, workers=workers))
               for shards, workers in ((remote, 2), (local, 0))]
    assert [b["key"] for b in batches[0]] == [b["key"] for b in batches[1]]
    assert all(b["image"].equal(c["image"]) for b, c in zip(*batches))
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.tar"))
    assert cached == list(local.names)  # each shard downloaded once into the cache


def test_a_dead_server_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SEED_SHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SEED_FETCH_RETRIES", "1")
    monkeypatch.setenv("SEED_FETCH_BACKOFF_S", "0.01")
    with pytest.raises(ShardError, match=r"http://127.0.0.1:\d+/manifest.json: cannot read it"):
        open_shards(f"http://127.0.0.1:{free_port()}/")


def test_pipe_and_fsspec_locations(converted, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SEED_SHARD_CACHE", str(tmp_path / "cache"))
    local = open_shards(converted)
    piped = open_shards(f"pipe:cat {converted}/{{name}}")
    assert piped.index.keys.tolist() == local.index.keys.tolist()
    assert SampleReader(piped).read(3) == SampleReader(local).read(3)
    with pytest.raises(ShardError, match=r"needs a \{name\} placeholder"):
        open_shards(f"pipe:cat {converted}/manifest.json")
    assert open_shards(f"file://{converted}").samples == 23
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for item in converted.iterdir():
        memory.pipe(f"/bucket/shards/{item.name}", item.read_bytes())
    in_memory = open_shards("memory://bucket/shards")
    assert SampleReader(in_memory).read(5) == SampleReader(local).read(5)
    with pytest.raises(ShardError, match="nosuchscheme://x: fsspec cannot read this scheme"):
        open_shards("nosuchscheme://x")


def test_the_cache_is_shared_by_concurrent_readers(http_shards, tmp_path) -> None:
    """Two processes opening and reading the same remote shards at once download each file
    once (a lock per file) and see whole files (atomic rename)."""
    script = ("import sys; from seed_core.data import open_shards; "
              "from seed_core.data.shardset import SampleReader; s = open_shards(sys.argv[1]); "
              "r = SampleReader(s); print(sum(len(r.read(i)) for i in range(s.samples)))")
    env = {**os.environ, "SEED_SHARD_CACHE": str(tmp_path / "shared")}
    procs = [subprocess.Popen([sys.executable, "-c", script, http_shards], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    totals = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert totals[0] == totals[1] and int(totals[0]) > 0
    assert not list((tmp_path / "shared").rglob("*.part"))


def test_val_classes_absent_from_train_are_refused(tmp_path) -> None:
    from seed_core.data.shardset import check_same_classes

    def shards(name: str, labels: list[int]) -> Path:
        rows = [(f"{name}{i}", c, png_bytes(np.full((4, 4), i, np.uint8)))
                for i, c in enumerate(labels)]
        write_tsv(tmp_path / f"{name}.tsv", rows)
        (tmp_path / "labelmap.txt").write_text("cat\ndog\nbird\nfish\n")
        convert_tsv_to_shards(tmp_path / f"{name}.tsv", tmp_path / name, workers=1)
        return tmp_path / name

    train = open_shards(shards("train", [0, 1, 2, 0, 1, 2]))
    check_same_classes(train, open_shards(shards("good", [2, 0, 1])))
    with pytest.raises(ShardError, match=r"classes \['fish'\] have val samples but no training"):
        check_same_classes(train, open_shards(shards("bad", [0, 3, 1])))
