"""The pipeline's default configuration, read from the repository's `params.yaml`, so that the
benchmarks' "default" case is what `dvc repro` runs today, not a copy that drifts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from seed_core.config import load_params

PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


@dataclass(frozen=True)
class DefaultConfig:
    teacher: str  # teacher.arch
    student: str  # student.arch
    batch: int  # distill.batch_size (global)
    size: int  # data.image_size
    queue: int  # distill.queue_size
    t_student: float
    t_teacher: float


def pipeline_defaults(path: Path = PARAMS) -> DefaultConfig:
    params = load_params(path)
    return DefaultConfig(teacher=params.teacher.arch, student=params.student.arch,
                         batch=params.distill.batch_size, size=params.data.image_size,
                         queue=params.distill.queue_size, t_student=params.distill.t_student,
                         t_teacher=params.distill.t_teacher)
