"""TSV -> WebDataset conversion: bit-exact round trips, bad records, strict mode, atomicity."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from seed_core.data.convert import (ShardConversionError, ShardWriter, convert_tsv_to_shards,
                                    safe_key)
from seed_core.data.images import image_extension, verify_image
from seed_core.data.shardset import open_shards
from seed_core.data.tsv import write_tsv

REPO = Path(__file__).resolve().parents[1]
REQUIRED_MANIFEST_KEYS = {"samples", "skipped", "num_classes", "shards", "source"}


def encode(fmt: str, seed: int = 0, size: tuple[int, int] = (20, 16)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array)
    if fmt == "GIF":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def line(key: str, label: int | str, data: bytes) -> bytes:
    return f"{key}\t{label}\t".encode() + base64.b64encode(data)


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(item + b"\n" for item in lines))
    return path


def read_samples(out_dir: Path) -> list[dict]:
    urls = open_shards(out_dir).paths
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def good_lines(n: int, fmt: str = "PNG") -> list[bytes]:
    return [line(f"img{i}", i % 3, encode(fmt, seed=i)) for i in range(n)]


def convert(tmp_path: Path, lines: list[bytes], **kwargs) -> dict:
    """Convert in TSV order, tolerating bad rows, unless told otherwise: the per-kind tests
    check where each bad row went; the shuffle and the threshold have their own tests."""
    tsv = write_lines(tmp_path / "in.tsv", lines)
    kwargs = {"workers": 1, "shuffle_seed": None, "max_bad_fraction": 0.9, **kwargs}
    return convert_tsv_to_shards(tsv, tmp_path / "out", **kwargs)


# --- safe keys and magic bytes ------------------------------------------------------------

def test_safe_key_keeps_plain_keys():
    assert safe_key("fmnist_train_000123") == "fmnist_train_000123"
    assert safe_key("n01440764-10026") == "n01440764-10026"


def test_safe_key_escapes_dots_slashes_and_percent_injectively():
    keys = ["n01440764_10026.JPEG", "n01440764_10026_JPEG", "a/b", "a%2Fb", "a b", "caf\u00e9",
            "x.y.z", "x%2Ey.z"]
    safe = [safe_key(k) for k in keys]
    assert safe[0] == "n01440764_10026%2EJPEG" and safe[2] == "a%2Fb" and safe[3] == "a%252Fb"
    assert len(set(safe)) == len(keys)
    assert all("." not in k and "/" not in k for k in safe)


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"),
                                      ("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tiff")])
def test_image_extension_from_magic_bytes(fmt, ext):
    data = encode(fmt)
    assert image_extension(data) == ext
    assert verify_image(data) == ext


def test_decode_image_falls_back_to_pil_format_for_unlisted_magic():
    buffer = io.BytesIO()
    Image.new("L", (4, 3)).save(buffer, format="PPM")
    assert image_extension(buffer.getvalue()) is None
    assert verify_image(buffer.getvalue()) in {"ppm", "pgm", "pbm", "pnm"}


# --- round trip ---------------------------------------------------------------------------

def test_round_trip_is_bit_exact_in_line_order(tmp_path):
    formats = ["JPEG", "PNG", "WEBP"] * 5
    rows = [(f"n0144_{i:03d}.JPEG" if i % 2 else f"key/{i}", i % 4, encode(fmt, seed=i))
            for i, fmt in enumerate(formats)]
    tsv = tmp_path / "train.tsv"
    write_tsv(tsv, rows)
    manifest = convert_tsv_to_shards(tsv, tmp_path / "out", shard_size=4, workers=2,
                                     shuffle_seed=None)

    assert REQUIRED_MANIFEST_KEYS <= set(manifest)
    assert manifest == open_shards(tmp_path / "out").manifest
    assert manifest["samples"] == manifest["lines"] == 15 and manifest["skipped"] == []
    assert manifest["num_classes"] == 4 and manifest["class_counts"] == [4, 4, 4, 3]
    out = tmp_path / "out"
    # each file's size and sha256, so a downloaded copy can be verified
    assert manifest["shards"] == [
        {"name": f"shard-{i:06d}.tar", "samples": n,
         "bytes": (out / f"shard-{i:06d}.tar").stat().st_size,
         "sha256": hashlib.sha256((out / f"shard-{i:06d}.tar").read_bytes()).hexdigest()}
        for i, n in enumerate([4, 4, 4, 3])]
    assert manifest["index"] == {"name": "index.bin", "bytes": (out / "index.bin").stat().st_size,
                                 "sha256": hashlib.sha256((out / "index.bin").read_bytes()
                                                          ).hexdigest()}
    # one consolidated index, no sidecar per shard
    assert sorted(p.name for p in out.iterdir()) == ["index.bin", "manifest.json"] + [
        f"shard-{i:06d}.tar" for i in range(4)]
    # in TSV order, the hash of the records written is the hash of the file
    assert manifest["source"] == {"path": str(tsv), "bytes": tsv.stat().st_size, "lines": 15,
                                  "offsets_from": "lineidx",
                                  "records_sha256": hashlib.sha256(tsv.read_bytes()).hexdigest()}
    assert manifest["order"] == {"shuffled": False}
    assert manifest["extensions"] == {"jpg": 5, "png": 5, "webp": 5}

    samples = read_samples(tmp_path / "out")
    assert len(samples) == len(rows)
    for number, (sample, (key, label, data)) in enumerate(zip(samples, rows), start=1):
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[formats[number - 1]]
        assert sample["__key__"] == safe_key(key)
        assert sample[ext] == data  # the original encoded bytes, untouched
        assert sample["cls"] == str(label).encode()
        assert json.loads(sample["json"]) == {"key": key, "line": number}
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {ext, "cls", "json"}


def test_plain_webdataset_decodes_the_samples(tmp_path):
    convert(tmp_path, good_lines(5, "JPEG"))
    dataset = wds.WebDataset(open_shards(tmp_path / "out").paths, shardshuffle=False)
    decoded = list(dataset.decode("pil").to_tuple("jpg", "cls"))
    assert [label for _, label in decoded] == [0, 1, 2, 0, 1]
    assert all(image.size == (20, 16) for image, _ in decoded)


def test_one_and_two_workers_write_identical_shards(tmp_path):
    lines = good_lines(40) + [b"broken"] + good_lines(3, "JPEG")
    tsv = write_lines(tmp_path / "in.tsv", lines)
    first = convert_tsv_to_shards(tsv, tmp_path / "one", shard_size=7, workers=1,
                                  max_bad_fraction=0.5)
    second = convert_tsv_to_shards(tsv, tmp_path / "two", shard_size=7, workers=2,
                                   max_bad_fraction=0.5)
    assert first == second and first["order"] == {"shuffled": True, "seed": 0}
    for entry in first["shards"]:
        assert ((tmp_path / "one" / entry["name"]).read_bytes()
                == (tmp_path / "two" / entry["name"]).read_bytes())


def test_reconversion_replaces_the_output(tmp_path):
    convert(tmp_path, good_lines(6), shard_size=2)
    manifest = convert(tmp_path, good_lines(3), shard_size=2)
    assert manifest["samples"] == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "index.bin", "manifest.json", "shard-000000.tar", "shard-000001.tar"]
    assert open_shards(tmp_path / "out").index.keys.size == 3


def test_labelmap_beside_the_tsv_sets_classes_and_range(tmp_path):
    (tmp_path / "labelmap.txt").write_text("cat\ndog\nbird\nfish\n")
    manifest = convert(tmp_path, [line("a", 1, encode("PNG")), line("b", 4, encode("PNG"))])
    assert manifest["num_classes"] == 4
    assert manifest["class_names"] == ["cat", "dog", "bird", "fish"]
    assert manifest["skipped"] == [
        {"line": 2, "reason": "label 4 out of range for the labelmap's 4 classes"}]


# --- bad records: one test per kind -------------------------------------------------------

def assert_one_skipped(manifest: dict, line_number: int, reason_part: str, lines: int) -> None:
    assert len(manifest["skipped"]) == 1, manifest["skipped"]
    entry = manifest["skipped"][0]
    assert entry["line"] == line_number and reason_part in entry["reason"], entry
    assert manifest["lines"] == lines == manifest["samples"] + len(manifest["skipped"])


def keys_written(out_dir: Path) -> list[str]:
    return [s["__key__"] for s in read_samples(out_dir)]


def test_wrong_column_count_is_skipped(tmp_path):
    lines = good_lines(3)
    lines.insert(1, b"k\t1\t" + base64.b64encode(encode("PNG")) + b"\textra")
    manifest = convert(tmp_path, lines)
    assert_one_skipped(manifest, 2, "expected 3 tab-separated columns (key, label, base64 "
                                    "image), got 4", lines=4)
    assert keys_written(tmp_path / "out") == ["img0", "img1", "img2"]


def test_invalid_base64_is_skipped(tmp_path):
    lines = good_lines(3) + [b"bad\t1\tnot*base64!"]
    assert_one_skipped(convert(tmp_path, lines), 4, "invalid base64", lines=4)


def test_truncated_image_is_skipped_after_full_decode(tmp_path):
    jpeg = encode("JPEG", size=(64, 64))
    with Image.open(io.BytesIO(jpeg[:len(jpeg) // 2])) as header_only:
        header_only.verify()  # the header alone looks fine: only decoding catches it
    lines = good_lines(2) + [line("cut", 0, jpeg[:len(jpeg) // 2])] + good_lines(1, "JPEG")
    lines[-1] = line("last", 0, jpeg)
    manifest = convert(tmp_path, lines)
    assert_one_skipped(manifest, 3, "not a decodable image (OSError: image file is truncated",
                       lines=4)


def test_bytes_that_are_no_image_are_skipped(tmp_path):
    lines = [line("junk", 0, b"definitely not an image")] + good_lines(2)
    assert_one_skipped(convert(tmp_path, lines), 1, "not a decodable image", lines=3)


def test_non_integer_label_is_skipped(tmp_path):
    lines = good_lines(2) + [line("x", "cat", encode("PNG"))]
    assert_one_skipped(convert(tmp_path, lines), 3, "non-integer label 'cat'", lines=3)


def test_fractional_label_is_skipped(tmp_path):
    lines = [line("x", "1.5", encode("PNG"))] + good_lines(1)
    assert_one_skipped(convert(tmp_path, lines), 1, "non-integer label '1.5'", lines=2)


def test_negative_label_is_skipped(tmp_path):
    lines = good_lines(2) + [line("neg", -3, encode("PNG"))]
    assert_one_skipped(convert(tmp_path, lines), 3, "negative label -3", lines=3)


def test_blank_line_is_skipped(tmp_path):
    lines = good_lines(2)
    lines.insert(1, b"   ")
    assert_one_skipped(convert(tmp_path, lines), 2, "blank line", lines=3)


def test_duplicate_key_keeps_the_first_occurrence(tmp_path):
    lines = good_lines(3) + [line("img1", 2, encode("PNG", seed=99))]
    manifest = convert(tmp_path, lines, workers=2)
    assert_one_skipped(manifest, 4, "duplicate key 'img1' (also on line 2)", lines=4)
    samples = read_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["img0", "img1", "img2"]
    assert samples[1]["png"] == encode("PNG", seed=1)


def test_every_kind_at_once_keeps_the_invariant(tmp_path):
    lines = good_lines(5)
    lines[1] = b""
    lines[3] = b"only\tone"
    manifest = convert(tmp_path, lines + [line("img0", 0, encode("PNG"))], workers=2)
    assert [e["line"] for e in manifest["skipped"]] == [2, 4, 6]
    assert manifest["samples"] == 3 and manifest["lines"] == 6


# --- strict mode (CLI) --------------------------------------------------------------------

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SEED_TRACKING": "0"}
    return subprocess.run([sys.executable, str(REPO / "stages" / "shards.py"), *args],
                          capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_strict_fails_on_the_first_bad_line(tmp_path):
    lines = good_lines(3) + [line("x", "cat", encode("PNG")), b""]
    tsv = write_lines(tmp_path / "in.tsv", lines)
    proc = run_cli("--tsv", str(tsv), "--out", str(tmp_path / "out"), "--strict",
                   "--keep-order", cwd=tmp_path)
    assert proc.returncode == 1
    assert f"{tsv}:4: non-integer label 'cat'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tsv"]


def test_cli_without_strict_skips_and_writes_metrics(tmp_path):
    lines = good_lines(3) + [line("x", "cat", encode("PNG"))]
    tsv = write_lines(tmp_path / "in.tsv", lines)
    proc = run_cli("--tsv", str(tsv), "--out", str(tmp_path / "out"), "--shard-size", "2",
                   "--workers", "2", "--metrics", str(tmp_path / "m.json"),
                   "--max-bad-fraction", "0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "4 lines, 3 samples written in 2 shards (shuffled), 1 skipped" in proc.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (metrics["samples"], metrics["skipped"], metrics["lines"]) == (3, 1, 4)
    assert metrics["records_per_s"] > 0


def test_cli_reports_a_missing_tsv(tmp_path):
    proc = run_cli("--tsv", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "out"),
                   cwd=tmp_path)
    assert proc.returncode == 1 and "nope.tsv: no such TSV file" in proc.stderr


def test_strict_function_raises_with_file_and_line(tmp_path):
    lines = good_lines(2) + [b"k\t1"]
    with pytest.raises(ShardConversionError, match=r"in\.tsv:3: expected 3"):
        convert(tmp_path, lines, strict=True, workers=2)
    assert not (tmp_path / "out").exists()


# --- atomicity ----------------------------------------------------------------------------

@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_conversion_leaves_no_output(tmp_path, monkeypatch, error, workers):
    original_write = ShardWriter.write

    def failing_write(self, *args):
        if len(self.shards) == 1 and self.shards[0]["samples"] == self.shard_size:
            raise error("interrupted after the first shard")
        original_write(self, *args)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    tsv = write_lines(tmp_path / "in.tsv", good_lines(300))
    with pytest.raises(error, match="interrupted after the first shard"):
        convert_tsv_to_shards(tsv, tmp_path / "out", shard_size=4, workers=workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tsv"]  # no out dir, no temp dir


def test_failed_conversion_keeps_the_previous_output(tmp_path, monkeypatch):
    convert(tmp_path, good_lines(3))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def boom(self, *args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ShardWriter, "write", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(tmp_path, good_lines(5))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tsv", "out"]


def test_default_conversion_writes_a_seeded_global_permutation(tmp_path):
    rows = [(f"k{i:02d}", i // 10, encode("PNG", seed=i)) for i in range(40)]  # class-sorted
    tsv = tmp_path / "in.tsv"
    write_tsv(tsv, rows)
    manifest = convert_tsv_to_shards(tsv, tmp_path / "a", shard_size=10, workers=2)
    again = convert_tsv_to_shards(tsv, tmp_path / "b", shard_size=10, workers=1)
    other = convert_tsv_to_shards(tsv, tmp_path / "c", shard_size=10, workers=1,
                                  shuffle_seed=7)
    keys = open_shards(tmp_path / "a").index.keys.tolist()
    assert manifest["order"] == {"shuffled": True, "seed": 0} and manifest == again
    assert keys == [f"k{i:02d}".encode() for i in np.random.default_rng(0).permutation(40)]
    assert keys != open_shards(tmp_path / "c").index.keys.tolist() and other["samples"] == 40
    assert manifest["class_counts"] == [10, 10, 10, 10]
    for shard in open_shards(tmp_path / "a").paths:  # class-sorted input, mixed shards
        labels = [int(s["cls"]) for s in wds.WebDataset(shard, shardshuffle=False)]
        assert len(set(labels)) >= 3
    for sample in read_samples(tmp_path / "a"):
        key = json.loads(sample["json"])["key"]
        assert sample["png"] == rows[int(key[1:])][2]  # bytes untouched, line numbers kept
        assert json.loads(sample["json"])["line"] == int(key[1:]) + 1


def test_without_lineidx_the_tsv_is_scanned(tmp_path):
    tsv = write_lines(tmp_path / "in.tsv", good_lines(12))
    manifest = convert(tmp_path, good_lines(12), shuffle_seed=5)
    assert manifest["source"]["offsets_from"] == "scan" and manifest["samples"] == 12
    assert not tsv.with_suffix(".lineidx").exists()


def test_a_stale_lineidx_is_detected(tmp_path):
    rows = [(f"k{i}", 0, encode("PNG", seed=i)) for i in range(6)]
    tsv = tmp_path / "in.tsv"
    write_tsv(tsv, rows)
    lines = tsv.read_bytes().splitlines(keepends=True)
    tsv.write_bytes(b"".join(lines[:3] + [b"k9\t0\t" + base64.b64encode(encode("PNG")) + b"\n"]
                             + lines[3:]))  # a line inserted after the index was written
    stale = r"is not the start of a line; the \.lineidx does not match|covers \d+ of the file"
    with pytest.raises(ShardConversionError, match=stale):
        convert_tsv_to_shards(tsv, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_more_bad_rows_than_the_threshold_fail_instead_of_shrinking(tmp_path):
    lines = good_lines(97) + [b"broken"] * 3
    with pytest.raises(ShardConversionError, match=r"3 of 100 lines are bad \(3.00%\), more than "
                                                   r"--max-bad-fraction 0.02; nothing was written"):
        convert(tmp_path, lines, max_bad_fraction=0.02)
    assert not (tmp_path / "out").exists()
    assert convert(tmp_path, lines, max_bad_fraction=0.03)["samples"] == 97
    proc = run_cli("--tsv", str(tmp_path / "in.tsv"), "--out", str(tmp_path / "cli"),
                   cwd=tmp_path)  # the default threshold: 1%
    assert proc.returncode == 1 and "more than --max-bad-fraction 0.01" in proc.stderr
    assert not (tmp_path / "cli").exists()


def test_an_image_bomb_is_refused_without_decoding(tmp_path):
    import resource
    import zlib

    # a valid 20,000 x 20,000 grayscale PNG header with a tiny (wrong) IDAT: decoding it would
    # need 400 MB; the size check reads the header only
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    header = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    lines = good_lines(3) + [line("bomb", 0, bomb)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    manifest = convert(tmp_path, lines)
    assert_one_skipped(manifest, 4, "400,000,000 pixels refused before decoding", lines=4)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_images_over_our_pixel_limit_are_refused_from_the_header(tmp_path):
    from seed_core.data.images import ImageError, open_image

    with pytest.raises(ImageError, match=r"200 x 100 = 20,000 pixels refused before decoding"):
        open_image(encode("PNG", size=(200, 100)), max_pixels=19_999)
    assert open_image(encode("PNG", size=(200, 100)), max_pixels=20_000).size == (200, 100)


def test_open_shards_reports_missing_shards(tmp_path):
    convert(tmp_path, good_lines(3), shard_size=2)
    (tmp_path / "out" / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        open_shards(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        open_shards(tmp_path)
