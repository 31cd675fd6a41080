"""params.yaml loads strictly: unknown keys, wrong types and broken invariants name the key."""

from pathlib import Path

import pytest
import yaml

from seed_core.config import (ConfigError, DistillConfig, flatten, load_params, parse_params,
                              small_patch_size)

ROOT = Path(__file__).resolve().parent.parent


def test_the_repository_params_load_with_the_contract_keys() -> None:
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every key of the file reaches the dataclasses unchanged (no silent default)
    flat = flatten(params)
    for section, values in raw.items():
        for key, value in values.items():
            assert flat[f"{section}.{key}"] == value, f"{section}.{key}"
    for key in ("data.limit_train", "data.limit_val", "data.image_size", "teacher.checkpoint",
                "teacher.arch", "student.arch", "pretrain.epochs", "distill.epochs",
                "distill.batch_size", "distill.queue_size", "distill.t_student",
                "distill.t_teacher", "distill.nproc", "distill.small_views",
                "distill.queue_init", "distill.checkpoint_every", "knn.k", "knn.temperature",
                "linear.epochs"):
        assert key in flat, key


def test_sections_are_frozen() -> None:
    params = parse_params({})
    with pytest.raises(AttributeError):
        params.distill.epochs = 3  # type: ignore[misc]


def test_unknown_key_is_named_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'distill\.epoch' \(known keys of "
                                          r"'distill': .*epochs"):
        parse_params({"distill": {"epoch": 3}})


def test_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown section 'distil'"):
        parse_params({"distil": {"epochs": 3}})


@pytest.mark.parametrize("section, key, value, message", [
    ("distill", "epochs", "ten", r"'distill\.epochs' must be int, got str 'ten'"),
    ("distill", "epochs", True, r"'distill\.epochs' must be int, got bool True"),
    ("distill", "epochs", 2.5, r"'distill\.epochs' must be int, got float 2\.5"),
    ("distill", "t_student", "hot", r"'distill\.t_student' must be float, got str 'hot'"),
    ("distill", "sync_bn", 1, r"'distill\.sync_bn' must be bool, got int 1"),
    ("distill", "queue_init", "zeros", r"'distill\.queue_init' must be one of "
                                       r"\['random', 'cache'\], got 'zeros'"),
    ("knn", "sweep_k", [10, "x"], r"'knn\.sweep_k\[1\]' must be int"),
    ("teacher", "arch", 18, r"'teacher\.arch' must be str, got int 18"),
])
def test_wrong_types_name_the_key(section: str, key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_params({section: {key: value}})


def test_ints_pass_as_floats_and_yaml11_exponents_are_read() -> None:
    # PyYAML reads `1e-4` (no dot) as a string; DVC's YAML 1.2 reader gives a float
    params = parse_params({"distill": {"t_student": 1, "t_teacher": "1e-4"}})
    assert params.distill.t_student == 1.0 and isinstance(params.distill.t_student, float)
    assert params.distill.t_teacher == pytest.approx(1e-4)


@pytest.mark.parametrize("raw, message", [
    ({"distill": {"batch_size": 10, "nproc": 4}},
     r"'distill\.batch_size' must be divisible by distill\.nproc=4"),
    ({"distill": {"queue_size": 128, "batch_size": 256}},
     r"'distill\.queue_size' must be >= the global batch distill\.batch_size=256"),
    ({"distill": {"t_teacher": 0}}, r"'distill\.t_teacher' must be > 0"),
    ({"data": {"limit_train": -1}}, r"'data\.limit_train' must be >= 0"),
    ({"data": {"image_size": 32}, "distill": {"small_size": 32}},
     r"'distill\.small_size' must be smaller than data\.image_size=32"),
])
def test_invariants_are_checked_at_load_time(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_load_params_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=rf"{path}: params: 'distill\.epochs' must be int"):
        load_params(path)
    path.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")


def test_small_patch_size_follows_seed_96_of_224() -> None:
    params = parse_params({"data": {"image_size": 224}})
    assert small_patch_size(params.data, params.distill) == 96
    params = parse_params({"data": {"image_size": 32}})
    assert small_patch_size(params.data, params.distill) == 14
    assert small_patch_size(params.data, DistillConfig(small_size=12)) == 12


def test_teacher_epochs_default_to_the_baseline_epochs() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_pretrain", ROOT / "stages" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    same = parse_params({"pretrain": {"epochs": 6}, "teacher": {"arch": "resnet18d"}})
    assert pretrain.role_arch(same, "teacher") == ("resnet18d", False, 6)
    longer = parse_params({"pretrain": {"epochs": 6, "teacher_epochs": 12}})
    assert pretrain.role_arch(longer, "teacher")[2] == 12
    assert pretrain.role_arch(longer, "baseline") == ("resnet10t", False, 6)
    with pytest.raises(ConfigError, match=r"'pretrain\.teacher_epochs' must be >= 0"):
        parse_params({"pretrain": {"teacher_epochs": -1}})
