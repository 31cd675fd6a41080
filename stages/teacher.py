"""Stage `teacher`: normalise a teacher checkpoint into the canonical `seed_distill` form.

    python stages/teacher.py --checkpoint FILE --arch ARCH --out DIR [--format auto|NAME]
        [--small-images | --no-small-images] [--shards DIR] [--verify-samples N]
        [--image-size N] [--metrics FILE]
    python stages/teacher.py --from-params [--params params.yaml] --out DIR [--shards DIR]
        [--pretrained-dir DIR] [--metrics FILE]

Writes `DIR/teacher.safetensors` and `DIR/teacher.json`. The checkpoint is read without running
any code from it (`torch.load(weights_only=True)` or safetensors) and converted strictly (see
`seed_core.checkpoints`). With `--shards`, the teacher's kNN top-1 on a held-out part of the
training shards is measured next to the same arch randomly initialised and to chance, so an easy
dataset cannot pass off a broken conversion as a good teacher.

With `--from-params` the `teacher.*` params fill every option not given on the command line; an
empty `teacher.checkpoint` means the pipeline's own pre-trained teacher
(`models/pretrain/teacher/model.safetensors`, already canonical; `--pretrained-dir` overrides).
`teacher.small_images: false` leaves the stem to the checkpoint (recorded or auto-detected);
`true` forces the small-image stem.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from seed_core.checkpoints import (CheckpointError, convert_checkpoint, encoder_from_states,
                                   known_formats, load_canonical, load_untrusted,
                                   resolve_canonical_file, save_canonical)
from seed_core.config import ConfigError, Params, load_params
from seed_core.distributed import pick_device
from seed_core.io import repo_root, sha256_file, write_json
from seed_core.models import Encoder, create_backbone
from seed_core.stagekit import setup_logging, tracked
from seed_core.tracking import Tracker

log = logging.getLogger("teacher")

PRETRAINED_DIR = "models/pretrain/teacher"
DEFAULT_IMAGE_SIZE = 32  # without params: the pipeline's default data.image_size
KNN_K, KNN_T = 20, 0.07  # the usual weighted-kNN headline (InstDisc / DINO)
HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Settings:
    checkpoint: Path
    arch: str
    fmt: str
    small_images: bool | None  # None: as recorded in / detected from the checkpoint
    verify_samples: int
    image_size: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="teacher checkpoint (.pth, .ckpt, .safetensors, ...)")
    parser.add_argument("--arch", help="backbone it was trained with (timm name or resnet50w2/4/5)")
    parser.add_argument("--out", required=True, help="directory for teacher.safetensors/.json")
    parser.add_argument("--format", choices=["auto", *known_formats()], default=None,
                        help="checkpoint layout (default: auto-detect from its keys)")
    parser.add_argument("--small-images", action=argparse.BooleanOptionalAction, default=None,
                        help="3x3 stride-1 stem without max-pool (default: as recorded/detected)")
    parser.add_argument("--shards", help="training shards: measure kNN top-1 on a held-out part")
    parser.add_argument("--verify-samples", type=int, default=None,
                        help="training samples used by the kNN check (default 2000)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="evaluation crop for the kNN check (default: data.image_size or 32)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--from-params", action="store_true",
                        help="read teacher.* from --params for options not given here")
    parser.add_argument("--pretrained-dir", default=PRETRAINED_DIR,
                        help="the pipeline's pre-trained teacher, used when teacher.checkpoint "
                             "is empty")
    parser.add_argument("--metrics", help="metrics JSON")
    args = parser.parse_args(argv)
    if not args.from_params and not (args.checkpoint and args.arch):
        parser.error("--checkpoint and --arch are required (or use --from-params)")
    if args.verify_samples is not None and args.verify_samples < 20:
        parser.error("--verify-samples must be >= 20")
    return args


def _find(path: str) -> Path:
    """A relative path from the working directory, else from the repository root."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    rooted = repo_root() / candidate
    return rooted if rooted.exists() else candidate


def resolve_settings(args: argparse.Namespace, params: Params | None) -> Settings:
    """Command-line options first, then (with --from-params) the `teacher.*` params."""
    cfg = params.teacher if (args.from_params and params is not None) else None
    checkpoint = args.checkpoint or (cfg.checkpoint if cfg else "") or args.pretrained_dir
    small = args.small_images
    if small is None and cfg is not None and cfg.small_images:
        small = True
    image_size = args.image_size or (params.data.image_size if params else DEFAULT_IMAGE_SIZE)
    return Settings(checkpoint=_find(checkpoint),
                    arch=args.arch or (cfg.arch if cfg else ""),
                    fmt=args.format or (cfg.format if cfg else "auto"),
                    small_images=small,
                    verify_samples=args.verify_samples or (cfg.verify_samples if cfg else 2000),
                    image_size=image_size)


def convert_teacher(settings: Settings) -> tuple[dict, dict, dict[str, Any]]:
    """Read the checkpoint safely and convert it; the metadata names the source file."""
    source = settings.checkpoint
    if not source.exists():
        raise CheckpointError(f"{source}: no such teacher checkpoint (with an empty "
                              "teacher.checkpoint, stage pretrain@teacher must run first)")
    if source.is_dir():
        source = resolve_canonical_file(source)
    obj = load_untrusted(source)
    backbone, head, meta = convert_checkpoint(obj, settings.arch, settings.fmt,
                                              settings.small_images)
    meta.update(source_path=str(source), source_sha256=sha256_file(source))
    return backbone, head, meta


@torch.no_grad()
def verify_knn(encoder: Encoder, shards_dir: str | Path, samples: int, image_size: int,
               device: torch.device | str) -> dict[str, Any]:
    """Weighted kNN top-1 (%) of the backbone features on a held-out part of the first
    `samples` training samples, with the same arch randomly initialised and chance beside it.
    """
    from seed_core.data import eval_loader, open_shards
    from seed_core.engine import extract_features
    from seed_core.evaluation import holdout_split, knn_classify
    from seed_core.transforms import eval_transform

    device = torch.device(device)
    num_classes = open_shards(shards_dir).num_classes
    loader = eval_loader(shards_dir, eval_transform(image_size), 256, workers=0, limit=samples)

    def top1(features_fn) -> tuple[float, int, int]:
        feats, labels, _ = extract_features(features_fn, loader, device)
        fit, held = holdout_split(labels, HOLDOUT_FRACTION, seed=0)
        scores = knn_classify(feats[fit], labels[fit], feats[held], KNN_K, KNN_T, num_classes)
        correct = (scores.argmax(dim=1).cpu() == labels[held]).float().mean().item()
        return 100.0 * correct, int(fit.numel()), int(held.numel())

    encoder = encoder.to(device).eval()
    teacher_top1, n_fit, n_held = top1(encoder.features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_init = create_backbone(encoder.backbone.arch_name, encoder.backbone.small_images)
    random_top1, _, _ = top1(random_init.to(device).eval())
    return {"knn_top1": round(teacher_top1, 3), "knn_top1_random_init": round(random_top1, 3),
            "knn_chance": round(100.0 / num_classes, 3), "knn_k": KNN_K,
            "knn_temperature": KNN_T, "knn_fit_samples": n_fit, "knn_heldout_samples": n_held,
            "knn_image_size": image_size}


def _check_round_trip(encoder: Encoder, out_dir: Path, image_size: int) -> None:
    """The written file must load strictly and give the same embeddings as the converted one."""
    loaded, _ = load_canonical(out_dir)
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    encoder = encoder.cpu().eval()
    with torch.no_grad():
        if not torch.allclose(encoder(x), loaded(x), rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"{out_dir}: the written teacher does not reproduce the converted "
                               "one's embeddings")


def run(args: argparse.Namespace, params: Params | None, tracker: Tracker) -> dict[str, Any]:
    started = time.perf_counter()
    settings = resolve_settings(args, params)
    if not settings.arch:
        raise CheckpointError("no architecture: pass --arch or set teacher.arch")
    log.info("converting %s (arch %s, format %s)", settings.checkpoint, settings.arch,
             settings.fmt)
    tracker.log_params({f"resolved.{k}": str(v) for k, v in asdict(settings).items()})
    backbone, head, meta = convert_teacher(settings)
    encoder = encoder_from_states(backbone, head, meta, where=str(settings.checkpoint))
    log.info("format %s: %s, %d features, head %s, embedding %d", meta["format"], meta["arch"],
             meta["feature_dim"], meta["head_layout"], meta["embed_dim"])
    if args.shards:
        meta.update(verify_knn(encoder, args.shards, settings.verify_samples,
                               settings.image_size, pick_device()))
        log.info("kNN top-1 %.2f%% (random init %.2f%%, chance %.2f%%)", meta["knn_top1"],
                 meta["knn_top1_random_init"], meta["knn_chance"])
    out_dir = Path(args.out)
    save_canonical(out_dir / "teacher.safetensors", backbone, head, meta)
    _check_round_trip(encoder, out_dir, max(32, settings.image_size))
    tracker.log_artifact(out_dir / "teacher.json")
    num_params = sum(t.numel() for t in backbone.values() if t.is_floating_point())
    return {"feature_dim": meta["feature_dim"], "embed_dim": meta["embed_dim"],
            "backbone_params_millions": round(num_params / 1e6, 3),
            **{k: v for k, v in meta.items() if k.startswith("knn_")},
            "seconds": round(time.perf_counter() - started, 3)}


def _load_params(args: argparse.Namespace) -> Params | None:
    """The params file when --from-params is given or it exists (for tracking); else None."""
    if args.from_params or Path(args.params).is_file():
        return load_params(args.params)
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    try:
        params = _load_params(args)
        with tracked("teacher", params) as tracker:
            summary = run(args, params, tracker)
            tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        sys.exit(f"teacher: {err}")  # the message alone: these are input errors, not bugs
    if args.metrics:
        write_json(args.metrics, summary)
    log.info("wrote %s/teacher.safetensors: %s", args.out, summary)


if __name__ == "__main__":
    main()
