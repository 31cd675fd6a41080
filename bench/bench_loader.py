"""Benchmark of the training loader; prints one JSON object.

On ImageNet-like JPEGs made from real photos that ship in the installed wheels (scikit-learn's
`datasets/images/china.jpg` and `flower.jpg`, matplotlib's `sample_data/grace_hopper.jpg`;
random crops resized to 500x375, quality 90), in one run:
- per core (one process, one torch thread) at 224 px (`--recipe-size`): ms per sample and
  samples/s of each recipe's CPU view, decode included, of `seed_core.data.transforms` against
  the 805c760 torchvision recipe (float tensors, kept below as the baseline), and the cores per
  GPU each needs to feed 3,000 and 10,000 img/s; for the SSL recipes also with the colour ops
  and the blur on the device (the CPU decodes, crops and flips);
- samples/s of our loader (`seed_core.data.train_loader`: reads at byte offsets, decodes, augments
  per sample) with 1 and 2 loader workers, at the default config's crop (`--size`);
- samples/s of a SEED-style TSV loader on the same TSV with the same transform and workers: a
  map-style dataset that seeks to the `.lineidx` offset, reads the line as text, splits it,
  base64-decodes the image and decodes it with PIL (`Image.open(...).convert('RGB')`), as
  SEED's `TSVDataset` does, shuffled by a `DataLoader`;
- samples/s the SEED step consumes at the default config (`params.yaml`'s teacher and student,
  with the pipeline's precision and memory format per model), so `loader / step` says whether
  data can keep up.

    python bench/bench_loader.py [--samples 3000] [--batch 256] [--size 32] [--repeats 3]
                                 [--recipe-size 224] [--recipe-samples 96]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from seed_core.data.convert import convert_tsv_to_shards
from seed_core.data.images import decode_image, decode_pixels
from seed_core.data.loader import seeded, train_loader
from seed_core.data.order import steps_per_epoch
from seed_core.data.shardset import open_shards
from seed_core.data.transforms import (eval_transform, moco_v2_transform, small_patch_transform,
                                       ssl_transform)
from seed_core.data.tsv import read_lineidx, write_tsv
from seed_core.distributed import pick_device
from seed_core.models.encoder import build_encoder
from seed_core.precision import autocast, channels_last, to_device
from seed_core.queue import EmbeddingQueue
from seed_core.train.distill import seed_step

from defaults import DefaultConfig, pipeline_defaults
from machine import cpu_name, load_average


PHOTOS = ("sklearn:datasets/images/china.jpg", "sklearn:datasets/images/flower.jpg",
          "matplotlib:mpl-data/sample_data/grace_hopper.jpg")
GPU_RATES = (3000, 10000)  # img/s: ~ResNet-50 AMP on one A100 (NVIDIA), ResNet-18 (FFCV)


def photo_paths() -> list[Path]:
    import matplotlib
    import sklearn
    roots = {"sklearn": Path(sklearn.__file__).parent,
             "matplotlib": Path(matplotlib.__file__).parent}
    return [roots[package] / path for package, path in (p.split(":") for p in PHOTOS)]


def photo_jpegs(count: int, seed: int = 0, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    """ImageNet-like JPEGs: random 4:3 crops (half the photo's width or more) of the shipped
    photos, resized to `size`, randomly flipped, quality 90 (~50-90 KB each)."""
    rng = np.random.default_rng(seed)
    photos = [Image.open(path).convert("RGB") for path in photo_paths()]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = photo.size
        w = int(rng.integers(width // 2, width + 1))
        h = min(height, w * size[1] // size[0])
        w = h * size[0] // size[1]
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        image = photo.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


# ----------------------------------------------------------------------------- the baseline
# The 805c760 recipes: torchvision transforms v2 on the decoded uint8 tensor, colour and blur on
# float in [0, 1], normalised on the CPU.


class _UnitFloat(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.as_subclass(torch.Tensor).float().div_(255.0)


class _Normalized(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
        self.std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.as_subclass(torch.Tensor)
        return ((x.expand(3, -1, -1) if x.shape[0] == 1 else x) - self.mean) / self.std


def _old_kernel(size: int) -> int:
    k = max(3, int(round(size * 0.1)))
    return k if k % 2 == 1 else k + 1


def old_recipe(name: str, size: int) -> T.Compose:
    """The 805c760 recipe `name` (moco_v2, moco_v1, swav, small_patch, eval) at `size`."""
    if name == "eval":
        resize = ([T.Resize(int(round(size / 0.875)), antialias=True), T.CenterCrop(size)]
                  if size >= 96 else [T.Resize((size, size), antialias=True)])
        return T.Compose([*resize, _UnitFloat(), _Normalized()])
    v2_colour = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                 T.RandomGrayscale(p=0.2),
                 T.RandomApply([T.GaussianBlur(_old_kernel(size), sigma=(0.1, 2.0))], p=0.5)]
    scale, colour = {"moco_v2": ((0.2, 1.0), v2_colour), "swav": ((0.14, 1.0), v2_colour),
                     "small_patch": ((0.05, 0.14), v2_colour),
                     "moco_v1": ((0.2, 1.0), [T.RandomGrayscale(p=0.2),
                                              T.ColorJitter(0.4, 0.4, 0.4, 0.4)])}[name]
    return T.Compose([T.RandomResizedCrop(size, scale=scale, antialias=True), _UnitFloat(),
                      *colour, T.RandomHorizontalFlip(), _Normalized()])


def old_decode(data: bytes) -> torch.Tensor:
    """805c760's `_Samples.decode`: uint8 `(C, H, W)` tensor."""
    pixels = torch.from_numpy(decode_pixels(data).copy())
    return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def new_recipe(name: str, size: int):
    if name == "eval":
        return eval_transform(size)
    if name == "small_patch":
        return small_patch_transform(size * 96 // 224)
    return ssl_transform(name, size)


RECIPE_NAMES = ("moco_v2", "moco_v1", "swav", "small_patch", "eval")  # simclr is moco_v1's


def per_sample_ms(decode, transform, jpegs: list[bytes], repeats: int) -> dict[str, float]:
    """Median over `repeats` passes of ms per sample: decode, and transform (seeded per
    sample, as the loader does), on one torch thread."""
    decode_ms, transform_ms = [], []
    for r in range(repeats):
        start = time.perf_counter()
        images = [decode(data) for data in jpegs]
        decoded = time.perf_counter()
        for i, image in enumerate(images):
            seeded(lambda: transform(image), 1000 * r + i)
        done = time.perf_counter()
        decode_ms.append(1e3 * (decoded - start) / len(jpegs))
        transform_ms.append(1e3 * (done - decoded) / len(jpegs))
    return {"decode_ms": statistics.median(decode_ms),
            "transform_ms": statistics.median(transform_ms)}


def recipes_per_core(size: int, samples: int, repeats: int) -> dict:
    """Per recipe, old against new: ms per sample, samples/s per core (decode + transform)
    and cores per GPU at `GPU_RATES`; old and new interleaved so that load hits both. For the
    SSL recipes also the CPU part when colour and blur run on the device (`View.geometry`,
    `seed_core.data.device_augment`)."""
    jpegs = photo_jpegs(samples, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name in RECIPE_NAMES:
            patch = size * 96 // 224 if name == "small_patch" else size
            old = per_sample_ms(old_decode, old_recipe(name, patch), jpegs, repeats)
            new = per_sample_ms(decode_image, new_recipe(name, size), jpegs, repeats)
            row: dict = {"size": patch}
            rows = [("old", old), ("new", new)]
            if name != "eval":  # colour and blur on the device: the CPU crops and flips only
                cpu_part = per_sample_ms(decode_image, new_recipe(name, size).geometry, jpegs,
                                         repeats)
                rows.append(("new_colour_on_device", cpu_part))
            for label, ms in rows:
                total = ms["decode_ms"] + ms["transform_ms"]
                row[label] = {**{k: round(v, 3) for k, v in ms.items()},
                              "samples_per_s_per_core": round(1e3 / total, 1),
                              **{f"cores_for_{rate}_img_per_s": round(rate * total / 1e3, 1)
                                 for rate in GPU_RATES}}
            row["speedup_transform"] = round(old["transform_ms"] / new["transform_ms"], 2)
            for label in ("new", "new_colour_on_device"):
                if label in row:
                    suffix = "" if label == "new" else "_colour_on_device"
                    row[f"speedup_with_decode{suffix}"] = round(
                        row[label]["samples_per_s_per_core"]
                        / row["old"]["samples_per_s_per_core"], 2)
            out[name] = row
        return out
    finally:
        torch.set_num_threads(threads)


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
        return self.transform(image), int(row[1])


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
    parser.add_argument("--recipe-size", type=int, default=224,
                        help="crop of the per-core recipe comparison")
    parser.add_argument("--recipe-samples", type=int, default=96,
                        help="JPEGs per pass of the per-core recipe comparison")
    args = parser.parse_args()
    load_at_start = load_average()
    per_core = recipes_per_core(args.recipe_size, args.recipe_samples, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tsv = root / "train.tsv"
        write_tsv(tsv, ((f"n{i % 100:08d}/img_{i}.JPEG", i % 100, jpeg)
                        for i, jpeg in enumerate(photo_jpegs(args.samples))))
        convert_tsv_to_shards(tsv, root / "shards", shard_size=1000, workers=2)
        shards = open_shards(root / "shards")
        transform = moco_v2_transform(args.size)
        steps = steps_per_epoch(shards, args.batch)
        result = {"device": str(pick_device()), "threads": torch.get_num_threads(),
                  "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
                  "load_average_at_start": load_at_start,
                  "samples": args.samples, "image": "500×375 photo JPEG",
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
    result["photos"] = list(PHOTOS)
    result["recipes_per_core"] = per_core
    result["ratios"] = {
        **{f"ours_over_seed_tsv_{w}_workers": ours[w] / seed[w] for w in ours},
        "ours_2_over_1_workers": ours["2"] / ours["1"],
        **{f"ours_{w}_workers_over_step": ours[w] / step_rate for w in ours},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
