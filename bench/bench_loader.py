"""Benchmark of the training loader; prints one JSON object.

On ImageNet-like data (synthetic 160-px JPEGs, a SEED TSV converted to shards), in one run:
- samples/s of our loader (`seed_core.data.train_loader`: reads at byte offsets, decodes, augments
  per sample) with 1 and 2 loader workers;
- samples/s of a SEED-style TSV loader on the same TSV with the same transform and workers: a
  map-style dataset that seeks to the `.lineidx` offset, reads the line as text, splits it,
  base64-decodes the image and decodes it with PIL (`Image.open(...).convert('RGB')`), as
  SEED's `TSVDataset` does, shuffled by a `DataLoader`;
- samples/s the SEED step consumes at the default config (`params.yaml`'s teacher and student,
  with the pipeline's precision and memory format per model), so `loader / step` says whether
  data can keep up.

    python bench/bench_loader.py [--samples 3000] [--batch 256] [--size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from seed_core.data.convert import convert_tsv_to_shards
from seed_core.data.loader import train_loader
from seed_core.data.order import steps_per_epoch
from seed_core.data.shardset import open_shards
from seed_core.data.transforms import moco_v2_transform
from seed_core.data.tsv import read_lineidx, write_tsv
from seed_core.distributed import pick_device
from seed_core.models.encoder import build_encoder
from seed_core.precision import autocast, channels_last, to_device
from seed_core.queue import EmbeddingQueue
from seed_core.train.distill import seed_step

from defaults import DefaultConfig, pipeline_defaults


def photo_like_jpeg(rng: np.random.Generator, side: int = 160) -> bytes:
    """A smooth random image with texture: compresses like a photo (~5-15 KB at 160 px)."""
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-20, 20, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class SeedTsvDataset(Dataset):
    """SEED's `TSVDataset`: text-mode seek + readline, split, base64, PIL decode, transform."""

    def __init__(self, tsv: Path, transform) -> None:
        self.tsv, self.transform = tsv, transform
        self.offsets = read_lineidx(tsv).tolist()
        self.fp = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int):
        if self.fp is None:
            self.fp = open(self.tsv, "r")  # noqa: SIM115 (one per worker, as SEED does)
        self.fp.seek(self.offsets[index])
        row = [s.strip() for s in self.fp.readline().split("\t")]
        image = Image.open(io.BytesIO(base64.b64decode(row[-1]))).convert("RGB")
        # a writable copy, as torchvision's ToTensor makes
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        return self.transform(tensor), int(row[1])


def samples_per_s(batches, samples_per_batch: int, repeats: int) -> float:
    """Median over `repeats` full passes of `batches()`."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        seen = sum(len(b["key"]) if isinstance(b, dict) else len(b[1]) for b in batches())
        rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates)


def step_samples_per_s(config: DefaultConfig, batch: int, size: int, repeats: int) -> float:
    """Samples/s of the SEED step at the default config (one process, this machine), with the
    precision and memory format `stages/distill.py` picks."""
    device = pick_device()
    torch.manual_seed(0)
    teacher = build_encoder(config.teacher, False, 128).to(device).eval().requires_grad_(False)
    student = build_encoder(config.student, False, 128).to(device)
    channels_last(teacher), channels_last(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.03, momentum=0.9)
    queue = EmbeddingQueue(config.queue, 128, device)
    queue.fill_random(torch.Generator().manual_seed(0))
    images = to_device(torch.randn(batch, 3, size, size), device)

    def step() -> None:
        seed_step(student, teacher, queue, [images], t_student=config.t_student,
                  t_teacher=config.t_teacher, optimizer=optimizer, scaler=None,
                  gather=lambda x: x, amp=lambda: autocast(device, "auto", student),
                  teacher_amp=lambda: autocast(device, "auto", teacher), where="bench",
                  with_stats=False)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    config = pipeline_defaults()
    parser.add_argument("--batch", type=int, default=config.batch)
    parser.add_argument("--size", type=int, default=config.size,
                        help="training crop (data.image_size)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        tsv = root / "train.tsv"
        write_tsv(tsv, ((f"n{i % 100:08d}/img_{i}.JPEG", i % 100, photo_like_jpeg(rng))
                        for i in range(args.samples)))
        convert_tsv_to_shards(tsv, root / "shards", shard_size=1000, workers=2)
        shards = open_shards(root / "shards")
        transform = moco_v2_transform(args.size)
        steps = steps_per_epoch(shards, args.batch)
        result = {"device": str(pick_device()), "threads": torch.get_num_threads(),
                  "samples": args.samples, "image": "160 px JPEG",
                  "teacher": config.teacher, "student": config.student,
                  "tsv_megabytes": round(tsv.stat().st_size / 1e6, 1), "batch": args.batch,
                  "crop": args.size, "ours_samples_per_s": {}, "seed_tsv_samples_per_s": {}}
        for workers in (1, 2):
            result["ours_samples_per_s"][str(workers)] = samples_per_s(
                lambda: train_loader(shards, transform, args.batch, seed=0, epoch=0, rank=0,
                                     world_size=1, steps=steps, workers=workers),
                args.batch, args.repeats)
            dataset = SeedTsvDataset(tsv, transform)
            result["seed_tsv_samples_per_s"][str(workers)] = samples_per_s(
                lambda: DataLoader(dataset, batch_size=args.batch, shuffle=True,
                                   num_workers=workers, drop_last=True),
                args.batch, args.repeats)
        step_rate = step_samples_per_s(config, args.batch, args.size, args.repeats)
    ours, seed = result["ours_samples_per_s"], result["seed_tsv_samples_per_s"]
    result["step_samples_per_s"] = step_rate
    result["ratios"] = {
        **{f"ours_over_seed_tsv_{w}_workers": ours[w] / seed[w] for w in ours},
        "ours_2_over_1_workers": ours["2"] / ours["1"],
        **{f"ours_{w}_workers_over_step": ours[w] / step_rate for w in ours},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
