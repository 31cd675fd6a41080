"""Stage `teacher`: normalise a teacher checkpoint into the canonical `seed_distill` form.

    python stages/teacher.py --checkpoint FILE --arch ARCH --out DIR [--format auto|NAME]
        [--small-images | --no-small-images] [--shards DIR] [--verify-samples N]
        [--image-size N] [--metrics FILE]
    python stages/teacher.py --from-params [--params params.yaml] --out DIR [--shards DIR]
        [--pretrained-dir DIR] [--metrics FILE]

Writes `DIR/teacher.safetensors` and `DIR/teacher.json`. The checkpoint is read without running
any code from it (`torch.load(weights_only=True)` or safetensors) and converted strictly (see
`seed_core.teachers`). With `--shards`, the teacher's kNN top-1 on a held-out part of the
training shards is measured against the same arch randomly initialised, on the same images, and
the stage fails (exit 1, nothing written) unless the teacher is clearly better: a one-sided
paired McNemar test at p < 0.01 and a gap of at least 2 points (`seed_core.teachers.verify`).
`--no-verify-gate` records the numbers without failing. The verification goes to `--metrics`,
never into the model files, so `DIR` stays byte-identical when only the kNN code changes (and
DVC does not re-run distillation for it).

With `--from-params` the `teacher.*` params fill every option not given on the command line.
`teacher.checkpoint` names a file (the pipeline's own pre-trained teacher,
`models/pretrain/teacher/model.safetensors`, or any external checkpoint), so DVC can track it as
a dependency; an empty value still means the pipeline's own (`--pretrained-dir`).
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

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import program
from seed_core.config import ConfigError, Params, load_params
from seed_core.distributed import pick_device
from seed_core.io import repo_root, sha256_file, write_json
from seed_core.models.encoder import Encoder
from seed_core.stagekit import run_times, setup_logging, tracked
from seed_core.teachers.canonical import (encoder_from_states, load_canonical,
                                          resolve_canonical_file, save_canonical)
from seed_core.teachers.common import CheckpointError
from seed_core.teachers.convert import convert_checkpoint
from seed_core.teachers.formats import known_formats
from seed_core.teachers.untrusted import load_untrusted
from seed_core.teachers.verify import verify_knn
from seed_core.tracking import Tracker

log = logging.getLogger("teacher")

PRETRAINED_DIR = "models/pretrain/teacher"
DEFAULT_IMAGE_SIZE = 32  # without params: the pipeline's default data.image_size


@dataclass(frozen=True)
class Settings:
    checkpoint: Path
    arch: str
    fmt: str
    small_images: bool | None  # None: as recorded in / detected from the checkpoint
    verify_samples: int
    image_size: int
    verify_gate: bool  # fail the stage when the teacher is not clearly above random init
    pipeline_teacher: bool  # the checkpoint is stage pretrain@teacher's output


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
    parser.add_argument("--metrics", help="metrics JSON (the kNN verification goes here)")
    parser.add_argument("--verify-gate", action=argparse.BooleanOptionalAction, default=None,
                        help="with --shards: fail unless the teacher is clearly better than a "
                             "randomly initialised network (default); --no-verify-gate only "
                             "records the numbers")
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
    given = args.checkpoint or (cfg.checkpoint if cfg else "")
    checkpoint = given or args.pretrained_dir
    small = args.small_images
    if small is None and cfg is not None and cfg.small_images:
        small = True
    image_size = args.image_size or (params.data.image_size if params else DEFAULT_IMAGE_SIZE)
    return Settings(checkpoint=_find(checkpoint),
                    arch=args.arch or (cfg.arch if cfg else ""),
                    fmt=args.format or (cfg.format if cfg else "auto"),
                    small_images=small,
                    verify_samples=args.verify_samples or (cfg.verify_samples if cfg else 2000),
                    image_size=image_size,
                    verify_gate=(args.verify_gate if args.verify_gate is not None
                                 else cfg.verify_gate if cfg else True),
                    pipeline_teacher=not given or PRETRAINED_DIR in Path(given).as_posix())


def convert_teacher(settings: Settings) -> tuple[dict, dict, dict[str, Any]]:
    """Read the checkpoint safely and convert it; the metadata names the source file."""
    source = settings.checkpoint
    if not source.exists():
        raise CheckpointError(f"{source}: no such teacher checkpoint ("
                              + ("the pipeline's own teacher: stage pretrain@teacher must run "
                                 "first)" if settings.pipeline_teacher
                                 else "fix teacher.checkpoint / --checkpoint)"))
    if source.is_dir():
        source = resolve_canonical_file(source)
    obj = load_untrusted(source)
    try:
        backbone, head, meta = convert_checkpoint(obj, settings.arch, settings.fmt,
                                                  settings.small_images)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    meta.update(source_path=str(source), source_sha256=sha256_file(source))
    return backbone, head, meta


def _check_round_trip(encoder: Encoder, out_dir: Path, image_size: int) -> None:
    """The written file must load strictly and give the same embeddings as the converted one."""
    loaded, _ = load_canonical(out_dir)
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    encoder = encoder.cpu().eval()
    with torch.no_grad():
        if not torch.allclose(encoder(x), loaded(x), rtol=1e-5, atol=1e-6):
            raise RuntimeError(f"{out_dir}: the written teacher does not reproduce the converted "
                               "one's embeddings")


class TeacherRejected(RuntimeError):
    """The kNN verification says the teacher is not clearly better than random init."""


def rejection_message(settings: Settings, verification: dict[str, Any]) -> str:
    """What failed, with the numbers, and what to do."""
    return (f"the teacher {settings.checkpoint} ({settings.arch}) is not clearly better than the "
            f"same architecture randomly initialised: kNN top-1 {verification['knn_top1']:.2f}% "
            f"vs {verification['knn_top1_random_init']:.2f}% on "
            f"{verification['knn_heldout_samples']} held-out training images; "
            + "; ".join(verification["knn_failures"])
            + ". Check that teacher.arch / --arch and teacher.format / --format match the "
              "checkpoint and that it is a trained one; a barely trained teacher needs more "
              "pre-training (pretrain.teacher_epochs); more teacher.verify_samples give the test "
              "more power. --no-verify-gate records the numbers without failing.")


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
    num_params = sum(t.numel() for t in backbone.values() if t.is_floating_point())
    summary: dict[str, Any] = {"arch": meta["arch"], "format": meta["format"],
                               "feature_dim": meta["feature_dim"], "embed_dim": meta["embed_dim"],
                               "backbone_params_millions": round(num_params / 1e6, 3)}
    if args.shards:
        verification = verify_knn(encoder, args.shards, settings.verify_samples,
                                  settings.image_size, pick_device())
        summary.update(verification)
        log.info("kNN top-1 %.2f%% (random init %.2f%%, chance %.2f%%; one-sided McNemar p = "
                 "%.3g)", verification["knn_top1"], verification["knn_top1_random_init"],
                 verification["knn_chance"], verification["knn_p_value"])
        if settings.verify_gate and not verification["knn_verified"]:
            summary["seconds"] = round(time.perf_counter() - started, 3)
            raise TeacherRejected(rejection_message(settings, verification), summary)
        if not verification["knn_verified"]:
            log.warning("%s", rejection_message(settings, verification))
    out_dir = Path(args.out)
    # the model files hold the conversion only: a kNN code change must leave them byte-identical
    save_canonical(out_dir / "teacher.safetensors", backbone, head, meta)
    _check_round_trip(encoder, out_dir, max(32, settings.image_size))
    tracker.log_artifact(out_dir / "teacher.json")
    return {**summary, "seconds": round(time.perf_counter() - started, 3)}


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
        with tracked("teacher", params, params_path=args.params) as tracker:
            summary = run(args, params, tracker)
            tracker.log_metrics({k: v for k, v in summary.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    except TeacherRejected as err:
        message, summary = err.args
        if args.metrics:  # the numbers behind the refusal, for the user to read
            write_json(args.metrics, {**summary, **run_times()})
        sys.exit(f"teacher: {message}")
    except (CheckpointError, ConfigError, FileNotFoundError) as err:
        sys.exit(f"teacher: {err}")  # the message alone: these are input errors, not bugs
    if args.metrics:
        write_json(args.metrics, {**summary, **run_times()})
    log.info("wrote %s/teacher.safetensors: %s", args.out, summary)


if __name__ == "__main__":
    program.run(main)
