"""Typed, frozen views of `params.yaml`, loaded strictly.

Each params section maps onto one frozen dataclass. An unknown key, a missing section or a value
of the wrong type is an error that names the key (`distill.epochs`), so a typo in
`dvc exp run -S` never becomes a silent no-op. Invariants that span keys are checked at load time.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A params.yaml value is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class DataConfig:
    source_dir: str = "/usr/share/datasets/fashion-mnist"
    # the SEED TSVs the shards are cut from; point them at your own (e.g. ImageNet) TSVs
    train_tsv: str = "data/fashion_mnist/train.tsv"
    val_tsv: str = "data/fashion_mnist/val.tsv"
    # 0 = all; otherwise a deterministic class-balanced subset (contract keys)
    limit_train: int = 0
    limit_val: int = 0
    image_size: int = 32  # contract key: side of every training / evaluation crop
    shard_size: int = 2000  # samples per WebDataset shard; keep shards >= ranks x workers
    workers: int = 1  # DataLoader worker processes per rank
    # fraction of train carved out (class-balanced) for tuning k, T and the linear lr
    holdout_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.limit_train >= 0, "data.limit_train", "must be >= 0 (0 = all)")
        _check(self.limit_val >= 0, "data.limit_val", "must be >= 0 (0 = all)")
        _check(self.image_size >= 8, "data.image_size", "must be >= 8")
        _check(self.shard_size >= 1, "data.shard_size", "must be >= 1")
        _check(self.workers >= 0, "data.workers", "must be >= 0")
        _check(0.0 < self.holdout_fraction < 0.5, "data.holdout_fraction", "must be in (0, 0.5)")


@dataclass(frozen=True)
class TeacherConfig:
    # empty: pre-train a teacher with MoCo-v2 in the pipeline (stage pretrain@teacher)
    checkpoint: str = ""
    arch: str = "resnet18"
    format: str = "auto"  # auto-detect from the checkpoint's keys, or a format name
    small_images: bool = False  # 3x3 stem without max-pool (CIFAR-style checkpoints)
    verify_samples: int = 2000  # held-out training samples for the kNN sanity check

    def __post_init__(self) -> None:
        _check(bool(self.arch), "teacher.arch", "must name an architecture")
        _check(self.verify_samples >= 20, "teacher.verify_samples", "must be >= 20")


@dataclass(frozen=True)
class StudentConfig:
    arch: str = "resnet10t"
    small_images: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.arch), "student.arch", "must name an architecture")


Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class PretrainConfig:
    """MoCo-v2 (Chen et al. 2020) for the in-pipeline teacher and the student's SSL baseline."""

    epochs: int = 8  # contract key: the student baseline's epochs (and the teacher's by default)
    # SEED's teachers train longer than its students (800 vs 200 epochs); 0 = `epochs`
    teacher_epochs: int = 0
    batch_size: int = 256  # global batch (split across ranks)
    lr: float = 0.03  # per 256 images; scaled by global batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    queue_size: int = 4096  # MoCo uses 65,536 on ImageNet; keep K << dataset size on small data
    temperature: float = 0.2
    # MoCo uses 0.999 for 200 ImageNet epochs; short runs need a faster key encoder
    key_momentum: float = 0.99
    embed_dim: int = 128
    hidden_dim: int = 0  # MLP hidden width; 0 = the backbone's feature width (MoCo-v2)
    nproc: int = 1
    precision: Precision = "auto"  # auto: fp16 AMP on CUDA, fp32 on CPU
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "pretrain.epochs", "must be >= 1")
        _check(self.teacher_epochs >= 0, "pretrain.teacher_epochs",
               "must be >= 0 (0 = pretrain.epochs)")
        _check(self.batch_size >= 2, "pretrain.batch_size", "must be >= 2")
        _check(self.nproc >= 1, "pretrain.nproc", "must be >= 1")
        _check(self.batch_size % self.nproc == 0, "pretrain.batch_size",
               f"must be divisible by pretrain.nproc={self.nproc}")
        _check(self.queue_size >= self.batch_size, "pretrain.queue_size",
               f"must be >= the global batch pretrain.batch_size={self.batch_size}")
        _check(0.0 <= self.key_momentum < 1.0, "pretrain.key_momentum", "must be in [0, 1)")
        _check(self.temperature > 0, "pretrain.temperature", "must be > 0")


@dataclass(frozen=True)
class DistillConfig:
    """SEED distillation; defaults follow the paper where it applies."""

    epochs: int = 8  # contract key; the paper trains 200 (800 for the best students)
    batch_size: int = 256  # contract key; global batch (split across ranks)
    lr: float = 0.03  # per 256 images; scaled by global batch / 256 (paper: 0.03)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0  # paper: 5 of 200
    # paper: 65,536 on ImageNet; on small data K must stay a fraction of the training set
    queue_size: int = 4096  # contract key
    t_student: float = 0.2  # contract key; paper --temp
    t_teacher: float = 1e-4  # contract key; paper --distill-t (a re-implementation uses 0.01)
    nproc: int = 1  # contract key: processes launched by torchrun
    small_views: int = 0  # contract key: small patches per image (SEED multi-view: 6)
    small_size: int = 0  # side of the small patches; 0 = image_size * 96 / 224 as in SEED
    queue_init: Literal["random", "cache"] = "random"  # contract key
    # SEED augments as the teacher's SSL method did; auto: swav/simclr/moco_v2 from its format
    augmentation: Literal["auto", "moco_v2", "swav", "simclr"] = "auto"
    checkpoint_every: int = 100  # contract key: steps between resumable checkpoints
    hidden_dim: int = 0  # student MLP hidden width; 0 = the backbone's feature width
    precision: Precision = "auto"
    sync_bn: bool = True  # with >1 rank, BN over the global batch (1-rank == N-rank runs)
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "distill.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "distill.batch_size", "must be >= 1")
        _check(self.nproc >= 1, "distill.nproc", "must be >= 1")
        _check(self.batch_size % self.nproc == 0, "distill.batch_size",
               f"must be divisible by distill.nproc={self.nproc}")
        _check(self.queue_size >= self.batch_size, "distill.queue_size",
               f"must be >= the global batch distill.batch_size={self.batch_size}")
        _check(self.t_student > 0, "distill.t_student", "must be > 0")
        _check(self.t_teacher > 0, "distill.t_teacher", "must be > 0")
        _check(self.small_views >= 0, "distill.small_views", "must be >= 0")
        _check(self.checkpoint_every >= 1, "distill.checkpoint_every", "must be >= 1")


@dataclass(frozen=True)
class FeaturesConfig:
    batch_size: int = 512
    precision: Precision = "auto"


@dataclass(frozen=True)
class KnnConfig:
    k: int = 20  # contract key; 20 is the usual headline (InstDisc used 200)
    temperature: float = 0.07  # contract key
    # extra k values scored on the holdout split to guide tuning (never on test)
    sweep_k: list[int] = field(default_factory=lambda: [10, 20, 50, 100, 200])

    def __post_init__(self) -> None:
        _check(self.k >= 1, "knn.k", "must be >= 1")
        _check(self.temperature > 0, "knn.temperature", "must be > 0")


@dataclass(frozen=True)
class LinearConfig:
    # augmented: MoCo protocol (RandomResizedCrop + flip every epoch through the frozen backbone)
    # cached: the classifier is trained on cached features (much faster)
    mode: Literal["augmented", "cached"] = "cached"
    epochs: int = 100  # contract key; MoCo: 100, lr x0.1 at 60% and 80%
    batch_size: int = 256
    lrs: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 30.0])  # picked on holdout
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "linear.epochs", "must be >= 1")
        _check(len(self.lrs) >= 1 and all(lr > 0 for lr in self.lrs), "linear.lrs",
               "must be a non-empty list of positive learning rates")


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "seed-distill"
    registered_model: str = "seed-student"


@dataclass(frozen=True)
class Params:
    data: DataConfig
    teacher: TeacherConfig
    student: StudentConfig
    pretrain: PretrainConfig
    distill: DistillConfig
    features: FeaturesConfig
    knn: KnnConfig
    linear: LinearConfig
    mlflow: MlflowConfig


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Params)}
SECTIONS = {name: globals()[tp] if isinstance(tp, str) else tp for name, tp in SECTIONS.items()}


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"params: '{key}' {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` checked against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"params: '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"params: '{key}' must be a list of {_type_name(item_tp)}, "
                              f"got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {key}: {tp}")
    # bool is an int subclass: a YAML `true` must not pass as an epoch count
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        # PyYAML (YAML 1.1) reads `1e-4` as a string; DVC's YAML 1.2 reads it as a float
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported annotation for {key}: {tp}")
    if not ok:
        raise ConfigError(f"params: '{key}' must be {_type_name(tp)}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def parse_section(name: str, raw: Any) -> Any:
    """Build the frozen dataclass of section `name` from its raw YAML mapping."""
    if name not in SECTIONS:
        raise ConfigError(f"params: unknown section '{name}' (known: {', '.join(SECTIONS)})")
    cls = SECTIONS[name]
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"params: section '{name}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"params: unknown key '{name}.{unknown[0]}' "
                          f"(known keys of '{name}': {', '.join(sorted(known))})")
    values = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in raw.items()}
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Build every section; sections absent from `raw` take their defaults."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("params: the top level must be a mapping of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"params: unknown section '{unknown[0]}' (known: {', '.join(SECTIONS)})")
    params = Params(**{name: parse_section(name, raw.get(name)) for name in SECTIONS})
    _check_cross_section(params)
    return params


def _check_cross_section(p: Params) -> None:
    if p.distill.small_size:
        _check(p.distill.small_size < p.data.image_size, "distill.small_size",
               f"must be smaller than data.image_size={p.data.image_size} (0 = automatic)")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate the whole params file; errors name the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file (run from the repository root)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_params(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def small_patch_size(data: DataConfig, distill: DistillConfig) -> int:
    """Side of SEED's small patches: 96 px at 224 px, scaled to `data.image_size` by default."""
    return distill.small_size or max(8, round(data.image_size * 96 / 224))


def flatten(params: Params) -> dict[str, Any]:
    """`{"distill.epochs": 8, ...}` for tracking every value of a run."""
    flat: dict[str, Any] = {}
    for section, values in dataclasses.asdict(params).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat
