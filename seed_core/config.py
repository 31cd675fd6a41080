"""Typed, frozen views of `params.yaml`, loaded strictly.

Each params section maps onto one frozen dataclass. An unknown key, a missing section or a value
of the wrong type is an error that names the file, the line and the key
(`params.yaml:61: params: 'distill.lr' must be > 0, got -0.03`), so a typo in `dvc exp run -S`
never becomes a silent no-op. Invariants that span keys are checked at load time; the two that
need run-time facts (the kNN bank's size, the backbone's stride) are functions a stage calls.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from seed_core.io import UserError


class ConfigError(UserError, ValueError):
    """A params.yaml value is missing, unknown or of the wrong type; `key` is the dotted key."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


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
    shard_size: int = 2000  # samples per WebDataset shard
    workers: int = 1  # DataLoader worker processes per rank
    # where the training views' colour ops and blur run: auto = on the GPU when training on CUDA
    # (the loader keeps decode, crop and flip), in the loader workers otherwise
    colour_on: Literal["auto", "cpu", "device"] = "auto"
    # unreadable TSV rows / shard samples tolerated (skipped and reported); above: the stage fails
    max_bad_fraction: float = 0.01
    # fraction of train carved out (class-balanced) for tuning k, T and the linear lr
    holdout_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.limit_train >= 0, "data.limit_train", "must be >= 0 (0 = all)",
               self.limit_train)
        _check(self.limit_val >= 0, "data.limit_val", "must be >= 0 (0 = all)", self.limit_val)
        _check(self.image_size >= 8, "data.image_size", "must be >= 8", self.image_size)
        _check(self.shard_size >= 1, "data.shard_size", "must be >= 1", self.shard_size)
        _check(self.workers >= 0, "data.workers", "must be >= 0", self.workers)
        _check(0.0 <= self.max_bad_fraction < 1.0, "data.max_bad_fraction", "must be in [0, 1)")
        _check(0.0 < self.holdout_fraction < 0.5, "data.holdout_fraction", "must be in (0, 0.5)",
               self.holdout_fraction)
        _check(self.seed >= 0, "data.seed", "must be >= 0 (numpy refuses negative seeds)",
               self.seed)


# where stage pretrain@teacher writes the teacher it pre-trains
PIPELINE_TEACHER = "models/pretrain/teacher/model.safetensors"


@dataclass(frozen=True)
class TeacherConfig:
    # the pipeline's own MoCo-v2 teacher (stage pretrain@teacher), or your checkpoint file: a real
    # DVC dependency either way, so a file replaced in place re-runs the teacher stage
    checkpoint: str = PIPELINE_TEACHER
    arch: str = "resnet18"
    format: str = "auto"  # auto-detect from the checkpoint's keys, or a format name
    small_images: bool = False  # 3x3 stem without max-pool (CIFAR-style checkpoints)
    verify_samples: int = 2000  # held-out training samples for the kNN sanity check
    # fail the stage when the teacher is not clearly above the same arch randomly initialised
    verify_gate: bool = True

    @property
    def pretrained_here(self) -> bool:
        """True when the teacher is the one stage pretrain@teacher trains (no external file)."""
        return self.checkpoint in ("", PIPELINE_TEACHER)

    def __post_init__(self) -> None:
        _check(bool(self.arch), "teacher.arch", "must name an architecture")
        _check(self.verify_samples >= 20, "teacher.verify_samples", "must be >= 20")


@dataclass(frozen=True)
class StudentConfig:
    arch: str = "mobilenetv3_small_050"
    small_images: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.arch), "student.arch", "must name an architecture")


Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class PretrainConfig:
    """MoCo-v2 (Chen et al. 2020) for the in-pipeline teacher and the student's SSL baseline."""

    epochs: int = 8  # contract key: the student baseline's epochs
    # SEED's teachers train longer than its students (800 vs 200 epochs). Its own key, with no
    # fallback to `epochs`, so that DVC re-runs the teacher's pre-training only when it changes
    teacher_epochs: int = 12
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
    # MoCo's shuffling BN: the key encoder normalises groups of this many keys of the shuffled
    # global batch (MoCo: 32 keys per GPU); 0 = the key batch at once, unshuffled (leaks)
    shuffle_bn_group: int = 32
    nproc: int = 1
    precision: Precision = "auto"  # auto: fp16 AMP on CUDA, fp32 on CPU
    # steps between resumable checkpoints; 0 = once per epoch
    checkpoint_every: int = 0
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "pretrain.epochs", "must be >= 1")
        _check(self.checkpoint_every >= 0, "pretrain.checkpoint_every",
               "must be >= 0 (0 = once per epoch)", self.checkpoint_every)
        _check(self.teacher_epochs >= 1, "pretrain.teacher_epochs", "must be >= 1",
               self.teacher_epochs)
        _check(self.batch_size >= 2, "pretrain.batch_size", "must be >= 2")
        _check(self.nproc >= 1, "pretrain.nproc", "must be >= 1")
        _check(self.batch_size % self.nproc == 0, "pretrain.batch_size",
               f"must be divisible by pretrain.nproc={self.nproc}")
        # one enqueue must fit; a multiple of the batch is not needed: the queue wraps around
        _check(self.queue_size >= self.batch_size, "pretrain.queue_size",
               f"must be >= the global batch pretrain.batch_size={self.batch_size}",
               self.queue_size)
        _check(0.0 <= self.key_momentum < 1.0, "pretrain.key_momentum", "must be in [0, 1)",
               self.key_momentum)
        _check(self.temperature > 0, "pretrain.temperature", "must be > 0", self.temperature)
        shortest = min(self.epochs, self.teacher_epochs)
        _check_optimizer("pretrain", self, shortest)
        _check(self.shuffle_bn_group >= 0, "pretrain.shuffle_bn_group",
               "must be >= 0 (0 = no shuffling BN)", self.shuffle_bn_group)
        per_rank = self.batch_size // self.nproc
        _check(self.shuffle_bn_group == 0 or per_rank % self.shuffle_bn_group == 0,
               "pretrain.shuffle_bn_group", f"must divide the {per_rank} keys of each of the "
               f"pretrain.nproc={self.nproc} processes (pretrain.batch_size / nproc)",
               self.shuffle_bn_group)
        _check(self.embed_dim >= 1, "pretrain.embed_dim", "must be >= 1", self.embed_dim)
        _check(self.hidden_dim >= 0, "pretrain.hidden_dim", "must be >= 0 (0 = feature width)",
               self.hidden_dim)


@dataclass(frozen=True)
class DistillConfig:
    """SEED distillation; defaults follow the paper where it applies."""

    epochs: int = 8  # contract key; the paper trains 200 (800 for the best students)
    batch_size: int = 256  # contract key; global batch (split across ranks)
    lr: float = 0.03  # per 256 images; scaled by global batch / 256 (paper: 0.03)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0  # paper: 5 of 200
    # warmup_cosine: per-step linear warm-up, then a cosine to 0; seed: SEED's released code
    # (constant for the warm-up epochs, then a per-epoch cosine; seed_core/train/schedule.py)
    lr_schedule: Literal["warmup_cosine", "seed"] = "warmup_cosine"
    # paper: 65,536 on ImageNet; on small data K must stay a fraction of the training set
    queue_size: int = 4096  # contract key
    t_student: float = 0.2  # contract key; paper --temp
    t_teacher: float = 1e-4  # contract key; paper --distill-t (a re-implementation uses 0.01)
    nproc: int = 1  # contract key: processes launched by torchrun
    small_views: int = 0  # contract key: small patches per image (SEED multi-view: 6)
    small_size: int = 0  # side of the small patches; 0 = image_size * 96 / 224 as in SEED
    queue_init: Literal["random", "cache"] = "random"  # contract key
    # SEED augments as the teacher's SSL method did; auto: swav/simclr/moco_v2 from its format
    augmentation: Literal["auto", "moco_v2", "moco_v1", "swav", "simclr"] = "auto"
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
        # one enqueue must fit; a multiple of the batch is not needed (SEED's code asserts
        # K % batch == 0 because its enqueue cannot wrap; EmbeddingQueue wraps around)
        _check(self.queue_size >= self.batch_size, "distill.queue_size",
               f"must be >= the global batch distill.batch_size={self.batch_size}",
               self.queue_size)
        _check(self.t_student > 0, "distill.t_student", "must be > 0", self.t_student)
        _check(self.t_teacher > 0, "distill.t_teacher", "must be > 0", self.t_teacher)
        _check(self.small_views >= 0, "distill.small_views", "must be >= 0", self.small_views)
        _check(self.small_size >= 0, "distill.small_size", "must be >= 0 (0 = automatic)",
               self.small_size)
        _check(self.checkpoint_every >= 1, "distill.checkpoint_every", "must be >= 1",
               self.checkpoint_every)
        _check_optimizer("distill", self, self.epochs)
        _check(self.hidden_dim >= 0, "distill.hidden_dim", "must be >= 0 (0 = feature width)",
               self.hidden_dim)


@dataclass(frozen=True)
class FeaturesConfig:
    batch_size: int = 512
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "features.batch_size", "must be >= 1", self.batch_size)


@dataclass(frozen=True)
class KnnConfig:
    # (k, T) is chosen on the holdout split from {k} + sweep_k x {temperature} + sweep_temperature;
    # the configured pair is always in the grid and wins ties (see evaluation.selection)
    k: int = 20  # contract key; 20 is the usual headline (InstDisc used 200)
    temperature: float = 0.07  # contract key
    sweep_k: list[int] = field(default_factory=lambda: [10, 20, 50, 100, 200])
    sweep_temperature: list[float] = field(default_factory=lambda: [0.03, 0.07, 0.1, 0.2])

    def __post_init__(self) -> None:
        _check(self.k >= 1, "knn.k", "must be >= 1")
        _check(self.temperature > 0, "knn.temperature", "must be > 0")
        _check(all(k >= 1 for k in self.sweep_k), "knn.sweep_k", "entries must be >= 1",
               self.sweep_k)
        _check(all(t > 0 for t in self.sweep_temperature), "knn.sweep_temperature",
               "entries must be > 0", self.sweep_temperature)


@dataclass(frozen=True)
class LinearConfig:
    # augmented: MoCo protocol (RandomResizedCrop + flip every epoch through the frozen backbone)
    # cached: the classifier is trained on cached features (much faster)
    mode: Literal["augmented", "cached"] = "cached"
    epochs: int = 100  # contract key; MoCo: 100, lr x0.1 at 60% and 80%
    batch_size: int = 256
    # picked on the holdout split; a pick at either end of the grid is flagged in the report
    lrs: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0, 30.0])
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
class ReproduceConfig:
    """`make reproduce`: each student trained as a MoCo-v2 baseline and as a SEED student from
    the pipeline's teacher, once per seed (the paper's student table in miniature)."""

    students: list[str] = field(default_factory=lambda: ["mobilenetv3_small_050", "resnet18"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    def __post_init__(self) -> None:
        _check(len(self.students) >= 1 and len(set(self.students)) == len(self.students),
               "reproduce.students", "must list distinct architectures", self.students)
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds)
               and all(s >= 0 for s in self.seeds), "reproduce.seeds",
               "must list distinct seeds >= 0", self.seeds)


@dataclass(frozen=True)
class LaunchConfig:
    """Where the torchrun stages (pretrain@*, distill) run (`seed_core.cluster`): on this machine,
    or as one SLURM job of `nodes` x `<stage>.nproc` ranks. Read at run time, never a DVC param:
    no setting here changes a result, so switching re-runs nothing."""

    backend: Literal["local", "slurm"] = "local"  # contract key
    nodes: int = 1  # contract key: SLURM nodes of the job (local: 1)
    # the sbatch options of the same names; "" / 0 = the cluster's default
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = ""  # time limit, e.g. "2-00:00:00"; the job requeues itself before it
    gpus_per_task: int = 0  # one GPU per rank on GPU clusters
    cpus_per_task: int = 0  # CPU cores per rank (data loader workers + 1)
    mem: str = ""  # memory per node, e.g. "64G"
    constraint: str = ""
    sbatch_args: list[str] = field(default_factory=list)  # any other options, e.g. --exclusive
    # SIGUSR1 this long before the time limit: the job requeues itself (SLURM may send it up to
    # a minute early: its timer ticks every 30 s)
    signal_delay_s: int = 120
    # after SIGTERM/SIGUSR1 a rank has this long to reach a step boundary and write its
    # checkpoint, else it exits at once (a rank blocked on a peer that is gone never would):
    # keep it under the cluster's KillWait (30 s by default)
    stop_grace_s: int = 15
    log_dir: str = "logs/slurm"  # job logs and batch scripts; on the shared filesystem

    def __post_init__(self) -> None:
        _check(self.nodes >= 1, "launch.nodes", "must be >= 1", self.nodes)
        _check(self.nodes == 1 or self.backend == "slurm", "launch.nodes",
               "> 1 needs launch.backend: slurm (locally, torchrun runs on this machine only)",
               self.nodes)
        _check(self.gpus_per_task >= 0, "launch.gpus_per_task", "must be >= 0 (0 = none)",
               self.gpus_per_task)
        _check(self.cpus_per_task >= 0, "launch.cpus_per_task", "must be >= 0 (0 = default)",
               self.cpus_per_task)
        _check(self.signal_delay_s >= 1, "launch.signal_delay_s", "must be >= 1",
               self.signal_delay_s)
        _check(self.stop_grace_s >= 1, "launch.stop_grace_s", "must be >= 1",
               self.stop_grace_s)
        _check(all(a.startswith("-") for a in self.sbatch_args), "launch.sbatch_args",
               "must be sbatch options, e.g. ['--exclusive']", self.sbatch_args)
        _check(bool(self.log_dir), "launch.log_dir", "must name a directory")


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
    reproduce: ReproduceConfig
    launch: LaunchConfig


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Params)}
SECTIONS = {name: globals()[tp] if isinstance(tp, str) else tp for name, tp in SECTIONS.items()}


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


_UNSET = object()


def _check(ok: bool, key: str, message: str, value: Any = _UNSET) -> None:
    if not ok:
        got = "" if value is _UNSET else f", got {value!r}"
        raise ConfigError(f"params: '{key}' {message}{got}", key)


def _check_optimizer(section: str, cfg: Any, epochs: int) -> None:
    """SGD settings shared by `pretrain` and `distill`; `epochs`: the shortest run they drive."""
    _check(cfg.lr > 0, f"{section}.lr", "must be > 0 (per 256 images)", cfg.lr)
    _check(0.0 <= cfg.momentum < 1.0, f"{section}.momentum", "must be in [0, 1)", cfg.momentum)
    _check(cfg.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0", cfg.weight_decay)
    _check(0.0 <= cfg.warmup_epochs <= epochs, f"{section}.warmup_epochs",
           f"must be in [0, {epochs}] (the run's epochs)", cfg.warmup_epochs)
    _check(cfg.log_every >= 1, f"{section}.log_every", "must be >= 1 (steps between logged "
           "values)", cfg.log_every)
    _check(cfg.seed >= 0, f"{section}.seed", "must be >= 0 (numpy refuses negative seeds)",
           cfg.seed)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` checked against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"params: '{key}' must be one of {list(choices)}, got {value!r}",
                              key)
        return value
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"params: '{key}' must be a list of {_type_name(item_tp)}, "
                              f"got {type(value).__name__} {value!r}", key)
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
                          f"got {type(value).__name__} {value!r}", key)
    return value


def parse_section(name: str, raw: Any) -> Any:
    """Build the frozen dataclass of section `name` from its raw YAML mapping."""
    if name not in SECTIONS:
        raise ConfigError(f"params: unknown section '{name}' (known: {', '.join(SECTIONS)})")
    cls = SECTIONS[name]
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"params: section '{name}' must be a mapping, got {type(raw).__name__}",
                          name)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"params: unknown key '{name}.{unknown[0]}' "
                          f"(known keys of '{name}': {', '.join(sorted(known))})",
                          f"{name}.{unknown[0]}")
    values = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in raw.items()}
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Build every section; sections absent from `raw` take their defaults."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("params: the top level must be a mapping of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"params: unknown section '{unknown[0]}' (known: {', '.join(SECTIONS)})",
                          unknown[0])
    params = Params(**{name: parse_section(name, raw.get(name)) for name in SECTIONS})
    _check_cross_section(params)
    return params


def _check_cross_section(p: Params) -> None:
    if p.distill.small_size:
        _check(p.distill.small_size < p.data.image_size, "distill.small_size",
               f"must be smaller than data.image_size={p.data.image_size} (0 = automatic)",
               p.distill.small_size)
    check_image_size(p)
    if p.launch.nodes > 1:  # every rank of every node takes an equal share of the global batch
        for name, cfg in (("pretrain", p.pretrain), ("distill", p.distill)):
            ranks = p.launch.nodes * cfg.nproc
            _check(cfg.batch_size % ranks == 0, f"{name}.batch_size",
                   f"must be divisible by launch.nodes x {name}.nproc = {ranks}", cfg.batch_size)


def key_lines(text: str) -> dict[str, int]:
    """1-based line of each `section`, `section.key` and `section.key[i]` of a params file."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}
    if not isinstance(root, yaml.MappingNode):
        return lines
    for section, body in root.value:
        lines[str(section.value)] = section.start_mark.line + 1
        if not isinstance(body, yaml.MappingNode):
            continue
        for key, value in body.value:
            dotted = f"{section.value}.{key.value}"
            lines[dotted] = key.start_mark.line + 1
            if isinstance(value, yaml.SequenceNode):
                for i, item in enumerate(value.value):
                    lines[f"{dotted}[{i}]"] = item.start_mark.line + 1
    return lines


def apply_overrides(raw: Any, overrides: Sequence[str]) -> dict[str, Any]:
    """`raw` params with `section.key=value` overrides applied (values read as YAML), as
    `dvc exp run -S` sets them; a malformed override names itself."""
    raw = dict(raw or {})
    for override in overrides:
        dotted, sep, value = override.partition("=")
        section, dot, key = dotted.partition(".")
        if not (sep and dot and section and key and "." not in key):
            raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. "
                              f"--set distill.seed=1")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {override!r}: not a YAML value ({err})", dotted) from None
        raw[section] = {**(raw.get(section) or {}), key: parsed}
    return raw


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Load and validate the whole params file, with `section.key=value` overrides on top;
    errors name the file, the line and the key (or the override)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file (run from the repository root)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_params(apply_overrides(raw, overrides))
    except ConfigError as err:
        overridden = [o for o in overrides if o.partition("=")[0] == err.key]
        if overridden:
            raise ConfigError(f"--set {overridden[-1]!r}: {err}", err.key) from None
        # a key absent from the file failed with its default's invariant: name the file alone
        line = key_lines(text).get(err.key or "")
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {err}", err.key) from None


# Total downsampling of each backbone family, measured by running every timm `resnet*`,
# `mobilenetv3*` and `efficientnet*` model (tests/test_config.py re-measures a sample): 32 with
# the ImageNet stem; with `small_images` 8 for ResNets (3x3 stride-1 conv1, no max-pool) and 16
# for the `conv_stem` families. An image smaller than the stride reaches the last stage(s) as a
# 1x1 map, where 3x3 kernels see one pixel in nine and the rest is zero padding: the model
# still runs (every size >= 1 px does), but its deepest layers no longer see an image.
FAMILY_STRIDES: tuple[tuple[str, int, int], ...] = (
    # (name prefix pattern, stride with the ImageNet stem, stride with small_images)
    (r"(resnet|resnext|seresnet|seresnext|ecaresnet|wide_resnet)", 32, 8),
    (r"(mobilenetv2|mobilenetv3|efficientnet|tf_efficientnet|tf_mobilenetv3)", 32, 16),
)


def min_image_size(arch: str, small_images: bool) -> int | None:
    """The smallest sensible `data.image_size` for `arch`: half its total stride (below it the
    last two stages see 1x1 maps of zero padding); None if the family is unknown."""
    for pattern, stride, small_stride in FAMILY_STRIDES:
        if re.match(pattern, arch):
            return (small_stride if small_images else stride) // 2
    return None


def check_image_size(p: Params) -> None:
    """Raise if `data.image_size` is below `min_image_size` of the teacher or student arch."""
    for role, cfg in (("student", p.student), ("teacher", p.teacher)):
        least = min_image_size(cfg.arch, cfg.small_images)
        if least is not None and p.data.image_size < least:
            small = min_image_size(cfg.arch, True)
            hint = ("" if cfg.small_images or small is None else
                    f", or set {role}.small_images: true (then >= {small})")
            _check(False, "data.image_size",
                   f"is below half of {role}.arch {cfg.arch}'s total stride ({2 * least}): its "
                   f"last two stages would see 1x1 maps of zero padding; use data.image_size >= "
                   f"{least}{hint}", p.data.image_size)


def check_knn_bank(k_values: list[int], bank_size: int, where: str) -> None:
    """Raise if a k of `knn.k` / `knn.sweep_k` exceeds the `bank_size` training features.

    `knn_neighbors` would clamp k to the bank silently and the report would name a k never used.
    """
    too_big = sorted({k for k in k_values if k > bank_size})
    if too_big:
        raise ConfigError(
            f"{where}: params: knn k {too_big} exceed(s) the kNN bank of {bank_size} training "
            f"samples (train minus the holdout split); lower knn.k / knn.sweep_k below "
            f"{bank_size + 1} or raise data.limit_train", "knn.k")


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
