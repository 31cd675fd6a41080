"""params.yaml loads strictly: unknown keys, wrong types and broken invariants name the key."""

from pathlib import Path

import pytest
import yaml

from seed_core.config import (ConfigError, DistillConfig, check_image_size, check_knn_bank,
                              flatten, key_lines, load_params, min_image_size, parse_params,
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
    with pytest.raises(ConfigError, match=rf"{path}:2: params: 'distill\.epochs' must be int"):
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


def test_teacher_and_baseline_epochs_are_separate_keys() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_pretrain", ROOT / "stages" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    # the teacher's epochs never follow pretrain.epochs: dvc.yaml's pretrain@teacher stage does
    # not depend on it, so a change of the baseline's epochs leaves the teacher cached
    same = parse_params({"pretrain": {"epochs": 6}, "teacher": {"arch": "resnet18d"}})
    assert pretrain.role_arch(same, "teacher") == ("resnet18d", False, 12)
    longer = parse_params({"pretrain": {"epochs": 6, "teacher_epochs": 12}})
    assert pretrain.role_arch(longer, "teacher")[2] == 12
    assert pretrain.role_arch(longer, "baseline") == ("mobilenetv3_small_050", False, 6)
    with pytest.raises(ConfigError, match=r"'pretrain\.teacher_epochs' must be >= 1"):
        parse_params({"pretrain": {"teacher_epochs": 0}})


@pytest.mark.parametrize("section", ["pretrain", "distill"])
@pytest.mark.parametrize("key, value, message", [
    ("lr", -0.03, r"must be > 0 \(per 256 images\), got -0\.03"),
    ("lr", 0, r"must be > 0"),
    ("momentum", -0.9, r"must be in \[0, 1\), got -0\.9"),
    ("momentum", 1.0, r"must be in \[0, 1\), got 1\.0"),
    ("weight_decay", -1e-4, r"must be >= 0, got -0\.0001"),
    ("warmup_epochs", -1, r"must be in \[0, 6\] \(the run's epochs\), got -1\.0"),
    ("warmup_epochs", 7, r"must be in \[0, 6\]"),
    ("log_every", 0, r"must be >= 1 \(steps between logged values\), got 0"),
    ("seed", -1, r"must be >= 0 \(numpy refuses negative seeds\), got -1"),
])
def test_optimizer_values_are_checked(section: str, key: str, value: object,
                                      message: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{section}\.{key}' {message}") as err:
        parse_params({section: {"epochs": 6, key: value}})
    assert err.value.key == f"{section}.{key}"


def test_pretrain_warmup_is_bounded_by_the_shorter_run() -> None:
    # a 2-epoch teacher cannot warm up for 3 epochs, even if the baseline runs 6
    with pytest.raises(ConfigError, match=r"'pretrain\.warmup_epochs' must be in \[0, 2\]"):
        parse_params({"pretrain": {"epochs": 6, "teacher_epochs": 2, "warmup_epochs": 3}})
    assert parse_params({"pretrain": {"epochs": 6, "teacher_epochs": 12,
                                      "warmup_epochs": 6}}).pretrain.warmup_epochs == 6.0


@pytest.mark.parametrize("raw, message", [
    ({"knn": {"sweep_k": [10, 0, 50]}}, r"'knn\.sweep_k' entries must be >= 1"),
    ({"knn": {"sweep_k": [-5]}}, r"'knn\.sweep_k' entries must be >= 1"),
    ({"features": {"batch_size": 0}}, r"'features\.batch_size' must be >= 1, got 0"),
    ({"data": {"seed": -3}}, r"'data\.seed' must be >= 0"),
    ({"distill": {"small_size": -1}}, r"'distill\.small_size' must be >= 0"),
    ({"pretrain": {"embed_dim": 0}}, r"'pretrain\.embed_dim' must be >= 1"),
    ({"distill": {"hidden_dim": -1}}, r"'distill\.hidden_dim' must be >= 0"),
])
def test_more_values_are_checked(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_queue_size_need_not_be_a_multiple_of_the_batch() -> None:
    # SEED's code asserts K % batch == 0 (its enqueue cannot wrap); EmbeddingQueue wraps, which
    # tests/test_queue.py checks against a naive FIFO, so only "one batch fits" is required
    params = parse_params({"distill": {"queue_size": 4100, "batch_size": 256},
                           "pretrain": {"queue_size": 300, "batch_size": 256}})
    assert params.distill.queue_size % params.distill.batch_size != 0
    with pytest.raises(ConfigError, match=r"'pretrain\.queue_size' must be >= the global batch "
                                          r"pretrain\.batch_size=256, got 255"):
        parse_params({"pretrain": {"queue_size": 255, "batch_size": 256}})


def test_errors_name_the_line_of_the_key(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    text = ("# comment\ndata:\n  image_size: 32\n\ndistill:\n  epochs: 6\n  lr: -0.03\n"
            "knn:\n  sweep_k:\n    - 10\n    - 0\n")
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}:7: params: 'distill\.lr' must be > 0"):
        load_params(path)
    path.write_text(text.replace("-0.03", "0.03").replace("- 0", "- ten"))
    with pytest.raises(ConfigError, match=rf"^{path}:11: params: 'knn\.sweep_k\[1\]' must be "
                                          rf"int, got str 'ten'"):
        load_params(path)
    path.write_text(text.replace("  lr: -0.03\n", "  lr: 0.03\n  epoch: 3\n"))
    with pytest.raises(ConfigError, match=rf"^{path}:8: params: unknown key 'distill\.epoch'"):
        load_params(path)
    assert key_lines(text)["data.image_size"] == 3 and key_lines(text)["knn"] == 8
    assert key_lines("[unclosed") == {}


def test_invariant_of_a_key_absent_from_the_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  batch_size: 8192\n")  # the default queue_size is now too small
    with pytest.raises(ConfigError, match=rf"^{path}: params: 'distill\.queue_size' must be >= "
                                          rf"the global batch distill\.batch_size=8192"):
        load_params(path)


def test_knn_k_above_the_bank_is_an_error() -> None:
    check_knn_bank([20, 10, 50], 50, "data/features/student")
    with pytest.raises(ConfigError, match=r"data/features/student: params: knn k \[50, 100\] "
                                          r"exceed\(s\) the kNN bank of 45 training samples "
                                          r"\(train minus the holdout split\); lower knn\.k / "
                                          r"knn\.sweep_k below 46"):
        check_knn_bank([20, 100, 50, 10], 45, "data/features/student")


# the measured strides: a sample of each family of FAMILY_STRIDES, with both stems
STRIDE_SAMPLE = ["resnet18", "resnet18d", "resnet10t", "resnet50", "resnet50w2", "resnext26ts",
                 "seresnext26d_32x4d", "ecaresnet26t", "wide_resnet50_2", "mobilenetv2_100",
                 "mobilenetv3_small_050", "mobilenetv3_large_100", "efficientnet_b0",
                 "tf_efficientnet_b0"]


@pytest.mark.parametrize("arch", STRIDE_SAMPLE)
def test_min_image_size_is_half_the_measured_stride(arch: str) -> None:
    import torch

    from seed_core.models.backbones import create_backbone

    for small in (False, True):
        try:
            with torch.device("meta"):  # shapes only: no weights, no compute
                model = create_backbone(arch, small_images=small)
                out = model.forward_features(torch.empty(1, 3, 256, 256))
        except ValueError as err:
            assert small and "no known stem" in str(err)  # small_images unsupported: no claim
            continue
        assert min_image_size(arch, small) == 256 // out.shape[-1] // 2, (arch, small)


def test_min_image_size_makes_no_claim_on_unknown_families() -> None:
    assert min_image_size("vit_small_patch16_224", False) is None
    assert min_image_size("convnext_tiny", True) is None


def test_image_size_below_half_the_stride_is_named_with_the_fix() -> None:
    check_image_size(parse_params({"data": {"image_size": 16}}))  # the tiny tests' size
    check_image_size(parse_params({"data": {"image_size": 8},
                                   "student": {"small_images": True},
                                   "teacher": {"small_images": True}}))
    # checked at load time: a params file cannot hold it
    with pytest.raises(ConfigError, match=r"'data\.image_size' is below half of student\.arch "
                                          r"resnet10t's total stride \(32\): .* use "
                                          r"data\.image_size >= 16, or set "
                                          r"student\.small_images: true \(then >= 4\), got 15"):
        parse_params({"data": {"image_size": 15}, "student": {"arch": "resnet10t"}})
    with pytest.raises(ConfigError, match=r"below half of teacher\.arch mobilenetv3_large_100's "
                                          r"total stride \(32\): .* >= 16, or set "
                                          r"teacher\.small_images: true \(then >= 8\), got 15"):
        parse_params({"data": {"image_size": 15}, "student": {"small_images": True},
                      "teacher": {"arch": "mobilenetv3_large_100"}})


def test_overrides_are_checked_like_the_file(tmp_path) -> None:
    """`--set section.key=value` (make reproduce's per-run params) goes through the same checks."""
    from seed_core.config import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text("distill:\n  epochs: 3\n")
    params = load_params(path, ["distill.seed=2", "student.arch=resnet18", "distill.lr=0.06"])
    assert (params.distill.seed, params.student.arch, params.distill.lr) == (2, "resnet18", 0.06)
    assert params.distill.epochs == 3  # the file's other values stay
    with pytest.raises(ConfigError, match=r"--set 'distill\.epoch=3': .*unknown key "
                                          r"'distill\.epoch'"):
        load_params(path, ["distill.epoch=3"])
    with pytest.raises(ConfigError, match=r"--set 'distill\.epochs=six': .*must be int"):
        load_params(path, ["distill.epochs=six"])
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        apply_overrides({}, ["seed=1"])
