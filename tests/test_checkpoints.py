"""Every teacher layout, built here from a random network in its source's own layout, must
convert to the canonical form and give the source network's features and head outputs."""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from seed_core.models.backbones import create_backbone
from seed_core.models.encoder import Encoder
from seed_core.models.heads import build_head, mlp_layout
from seed_core.teachers.canonical import (load_canonical, read_canonical_meta, save_canonical,
                                          save_encoder)
from seed_core.teachers.common import CanonicalCheckpoint, CheckpointError
from seed_core.teachers.convert import convert_checkpoint
from seed_core.teachers.formats import detect_format, known_formats
from seed_core.teachers.heads import infer_head_layout
from seed_core.teachers.untrusted import load_untrusted

X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


class DDP(nn.Module):
    """Stands in for DistributedDataParallel: the wrapped model's keys gain `module.`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* BN statistics, so a lost running_var cannot pass unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return module.eval()


def resnet18(num_classes: int = 1000, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise(torchvision.models.resnet18(num_classes=num_classes), seed)


def tv_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled features of a torchvision ResNet, whatever its `fc` holds."""
    body = copy.deepcopy(net)
    body.fc = nn.Identity()
    return body.eval()(x)


def optimizer_junk(model: nn.Module) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return opt.state_dict()


@dataclass
class Case:
    path: Path
    features: torch.Tensor  # (B, F) of the source network
    head_out: torch.Tensor | None  # (B, D) of the source head, before L2 normalisation
    layout: list | None
    dropped: set[str]  # drop patterns expected in meta["dropped"]


def make_torchvision(tmp: Path) -> Case:
    net = resnet18(num_classes=10)
    torch.save(net.state_dict(), tmp / "resnet18.pth")
    return Case(tmp / "resnet18.pth", tv_features(net, X), None, None, {"fc."})


def make_moco(tmp: Path, v2: bool) -> Case:
    q = resnet18(num_classes=16)
    if v2:
        q.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), q.fc)
    model = nn.Module()
    model.encoder_q, model.encoder_k = q, copy.deepcopy(q)
    model.register_buffer("queue", F.normalize(torch.randn(16, 64), dim=0))
    model.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
    wrapped = DDP(model)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": wrapped.state_dict(),
                "optimizer": optimizer_junk(wrapped)}, tmp / "checkpoint_0199.pth.tar")
    feats = tv_features(q, X)
    layout = (mlp_layout(512, 512, 16) if v2 else [["linear", 512, 16, True]])
    return Case(tmp / "checkpoint_0199.pth.tar", feats, q.fc(feats), layout,
                {"encoder_k.", "queue", "queue_ptr"})


def bn_mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """MoCo v3's `_build_mlp(2, ...)`: the last BN has no affine parameters."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, out, bias=False),
                         nn.BatchNorm1d(out, affine=False))


def make_moco_v3(tmp: Path) -> Case:
    base = resnet18()
    base.fc = randomise(bn_mlp(512, 64, 32), seed=3)
    model = nn.Module()
    model.base_encoder, model.momentum_encoder = base, copy.deepcopy(base)
    model.predictor = bn_mlp(32, 64, 32)
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": DDP(model).state_dict(),
                "optimizer": optimizer_junk(model), "scaler": {"scale": 1024.0}},
               tmp / "r-18-1000ep.pth.tar")
    feats = tv_features(base, X)
    layout = [["linear", 512, 64, False], ["bn", 64, True], ["relu"], ["linear", 64, 32, False],
              ["bn", 32, False]]
    return Case(tmp / "r-18-1000ep.pth.tar", feats, base.fc(feats), layout,
                {"momentum_encoder.", "predictor."})


def make_simclr(tmp: Path) -> Case:
    net = resnet18(num_classes=1000)
    # the converted releases come from TF: no BN counters
    state = {k: v for k, v in net.state_dict().items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": state}, tmp / "resnet18-1x.pth")
    return Case(tmp / "resnet18-1x.pth", tv_features(net, X), None, None, {"fc."})


def make_swav(tmp: Path) -> Case:
    net = resnet18()
    net.fc = nn.Identity()
    net.projection_head = randomise(nn.Sequential(
        nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(inplace=True), nn.Linear(64, 16)), 4)
    net.prototypes = nn.Linear(16, 30, bias=False)
    torch.save(DDP(net).state_dict(), tmp / "swav_800ep_pretrain.pth.tar")
    feats = net(X)
    layout = [["linear", 512, 64, True], ["bn", 64, True], ["relu"], ["linear", 64, 16, True]]
    return Case(tmp / "swav_800ep_pretrain.pth.tar", feats, net.projection_head(feats), layout,
                {"prototypes"})


def make_dino(tmp: Path) -> Case:
    backbone = resnet18()
    backbone.fc = nn.Identity()
    head = nn.Module()
    head.mlp = nn.Sequential(nn.Linear(512, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                             nn.Linear(64, 16))
    head.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(16, 100, bias=False))
    teacher = nn.Module()
    teacher.backbone, teacher.head = backbone, head
    student = copy.deepcopy(teacher)
    torch.save({"student": DDP(student).state_dict(), "teacher": DDP(teacher).state_dict(),
                "optimizer": optimizer_junk(student), "epoch": 100,
                "args": argparse.Namespace(arch="resnet50", out_dim=60000, lr=0.3),
                "dino_loss": {"center": torch.zeros(1, 100)}}, tmp / "checkpoint.pth")
    feats = backbone(X)
    layout = [["linear", 512, 64, True], ["gelu"], ["linear", 64, 64, True], ["gelu"],
              ["linear", 64, 16, True]]
    return Case(tmp / "checkpoint.pth", feats, head.mlp(feats), layout, {"head.last_layer."})


def make_solo_learn(tmp: Path) -> Case:
    model = nn.Module()
    model.backbone = resnet18()
    model.backbone.fc = nn.Identity()
    model.projector = randomise(nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(),
                                              nn.Linear(64, 16)), 5)
    model.momentum_backbone = copy.deepcopy(model.backbone)
    model.momentum_projector = copy.deepcopy(model.projector)
    model.classifier = nn.Linear(512, 10)
    model.register_buffer("queue", torch.randn(2, 16, 64))
    model.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
    torch.save({"epoch": 399, "global_step": 1000, "pytorch-lightning_version": "2.0.9",
                "state_dict": model.state_dict(), "loops": {}, "callbacks": {},
                "optimizer_states": [optimizer_junk(model)], "lr_schedulers": [],
                "hyper_parameters": {"method": "mocov2plus", "backbone": {"name": "resnet18"}}},
               tmp / "mocov2plus-cifar-ep=399.ckpt")
    feats = model.backbone(X)
    layout = [["linear", 512, 64, True], ["bn", 64, True], ["relu"], ["linear", 64, 16, True]]
    return Case(tmp / "mocov2plus-cifar-ep=399.ckpt", feats, model.projector(feats), layout,
                {"momentum_", "classifier.", "queue"})


def make_vissl(tmp: Path) -> Case:
    net = resnet18()
    trunk = nn.Module()
    trunk._feature_blocks = nn.ModuleDict({
        "conv1": net.conv1, "bn1": net.bn1, "conv1_relu": net.relu, "maxpool": net.maxpool,
        "layer1": net.layer1, "layer2": net.layer2, "layer3": net.layer3, "layer4": net.layer4,
        "avgpool": net.avgpool})
    heads = nn.Sequential(nn.Linear(512, 1000))
    torch.save({"phase_idx": 799, "iteration": 12345, "type": "checkpoint",
                "classy_state_dict": {
                    "base_model": {"model": {"trunk": trunk.state_dict(),
                                             "heads": heads.state_dict()}, "meta": {}},
                    "optimizer": optimizer_junk(heads), "loss": {}}},
               tmp / "model_final_checkpoint_phase799.torch")
    return Case(tmp / "model_final_checkpoint_phase799.torch", tv_features(net, X), None, None,
                set())


def make_barlow_twins(tmp: Path) -> Case:
    model = nn.Module()
    model.backbone = resnet18()
    model.backbone.fc = nn.Identity()
    model.projector = randomise(nn.Sequential(
        nn.Linear(512, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(True),
        nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(True),
        nn.Linear(64, 32, bias=False)), 6)
    model.bn = nn.BatchNorm1d(32, affine=False)
    torch.save({"epoch": 1000, "model": DDP(model).state_dict(),
                "optimizer": optimizer_junk(model)}, tmp / "checkpoint.pth")
    feats = model.backbone(X)
    layout = [["linear", 512, 64, False], ["bn", 64, True], ["relu"],
              ["linear", 64, 64, False], ["bn", 64, True], ["relu"], ["linear", 64, 32, False]]
    return Case(tmp / "checkpoint.pth", feats, model.projector(feats), layout, {"bn."})


def make_seed(tmp: Path) -> Case:
    student = resnet18(num_classes=16)
    student.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), student.fc)
    teacher = resnet18(num_classes=16, seed=7)
    model = nn.Module()
    model.student, model.teacher = student, teacher
    model.register_buffer("queue", torch.randn(16, 64))
    model.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": DDP(model).state_dict(),
                "optimizer": optimizer_junk(model)},
               tmp / "Teacher_moco_T-Epoch_200_Student_resnet18-checkpoint_0199.pth.tar")
    feats = tv_features(student, X)
    return Case(tmp / "Teacher_moco_T-Epoch_200_Student_resnet18-checkpoint_0199.pth.tar",
                feats, student.fc(feats), mlp_layout(512, 512, 16),
                {"teacher.", "queue", "queue_ptr"})


def make_seed_distill(tmp: Path) -> Case:
    torch.manual_seed(2)
    encoder = randomise(Encoder(create_backbone("resnet18"),
                                build_head(mlp_layout(512, 32, 8))), 8)
    save_encoder(tmp / "model.safetensors", encoder, method="moco_v2")
    feats = encoder.features(X)
    return Case(tmp / "model.safetensors", feats, encoder.head(feats), mlp_layout(512, 32, 8),
                set())


MAKERS: dict[str, Callable[[Path], Case]] = {
    "torchvision": make_torchvision,
    "moco_v1": lambda tmp: make_moco(tmp, v2=False),
    "moco_v2": lambda tmp: make_moco(tmp, v2=True),
    "moco_v3": make_moco_v3,
    "simclr": make_simclr,
    "swav": make_swav,
    "dino": make_dino,
    "solo_learn": make_solo_learn,
    "vissl": make_vissl,
    "barlow_twins": make_barlow_twins,
    "seed": make_seed,
    "seed_distill": make_seed_distill,
}


def test_every_format_has_a_test() -> None:
    assert sorted(MAKERS) == sorted(known_formats())


def assert_same_encoder(encoder: Encoder, case: Case) -> None:
    with torch.no_grad():
        torch.testing.assert_close(encoder.features(X), case.features)
        expected = case.head_out if case.head_out is not None else case.features
        torch.testing.assert_close(encoder(X), F.normalize(expected, dim=1))


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_format_round_trip(fmt: str, tmp_path: Path) -> None:
    case = MAKERS[fmt](tmp_path)
    obj = load_untrusted(case.path)
    assert detect_format(obj) == fmt
    backbone, head, meta = convert_checkpoint(obj, "resnet18")
    assert meta["format"] == fmt and meta["arch"] == "resnet18"
    assert meta["head_layout"] == case.layout and meta["head"] == (case.layout is not None)
    assert meta["feature_dim"] == 512
    assert meta["embed_dim"] == (case.head_out.shape[1] if case.head_out is not None else 512)
    assert set(meta["dropped"]) == case.dropped
    assert meta["small_images"] is False

    out = save_canonical(tmp_path / "out" / "teacher", backbone, head, meta)
    assert out == tmp_path / "out" / "teacher.safetensors"
    encoder, loaded_meta = load_canonical(tmp_path / "out")
    assert not encoder.training
    assert loaded_meta == json.loads((tmp_path / "out" / "teacher.json").read_text())
    assert_same_encoder(encoder, case)


def test_forced_format_matches_auto(tmp_path: Path) -> None:
    case = make_moco(tmp_path, v2=True)
    obj = load_untrusted(case.path)
    auto = convert_checkpoint(obj, "resnet18")
    forced = convert_checkpoint(obj, "resnet18", fmt="moco_v2")
    assert forced[2] == auto[2]
    assert all(torch.equal(forced[0][k], auto[0][k]) for k in auto[0])


def test_wrong_forced_format_errors(tmp_path: Path) -> None:
    obj = load_untrusted(make_moco(tmp_path, v2=True).path)
    with pytest.raises(CheckpointError, match="not a swav checkpoint.*forced.*auto-detection "
                                              "says moco_v2"):
        convert_checkpoint(obj, "resnet18", fmt="swav")
    # a plain-keys format on MoCo's keys: the strict check names the keys that do not fit
    with pytest.raises(CheckpointError, match="unexpected keys: module.encoder_k.*format "
                                              "simclr was forced"):
        convert_checkpoint(obj, "resnet18", fmt="simclr")
    with pytest.raises(CheckpointError, match="unknown format 'mocov2'.*moco_v2"):
        convert_checkpoint(obj, "resnet18", fmt="mocov2")


def test_wrong_arch_names_keys_and_arch(tmp_path: Path) -> None:
    obj = load_untrusted(make_moco(tmp_path, v2=True).path)
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(obj, "resnet34")
    message = str(err.value)
    assert "resnet34" in message and "80 missing keys" in message
    assert "layer1.2.bn1.bias" in message
    with pytest.raises(CheckpointError, match=r"shape mismatches: layer1\.0\.conv1\.weight "
                                              r"checkpoint \(64, 64, 3, 3\) vs model"):
        convert_checkpoint(obj, "resnet50")


def test_unknown_arch_is_a_checkpoint_error(tmp_path: Path) -> None:
    obj = load_untrusted(make_torchvision(tmp_path).path)
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet50x9'.*resnet50w2"):
        convert_checkpoint(obj, "resnet50x9")


def test_unknown_layout_lists_formats_and_keys() -> None:
    obj = {"weights": {"conv1.weight": torch.zeros(1)}, "step": 3}
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint(obj, "resnet18")
    message = str(err.value)
    assert "unrecognised checkpoint layout" in message
    assert "['weights', 'step']" in message
    assert all(name in message for name in known_formats())


def test_stray_keys_are_errors_not_dropped(tmp_path: Path) -> None:
    case = make_moco(tmp_path, v2=True)
    ckpt = torch.load(case.path, weights_only=True)
    ckpt["state_dict"]["module.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="module.extra_head.weight|extra_head.weight"):
        convert_checkpoint(ckpt, "resnet18")


def test_code_executing_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": resnet18().state_dict(), "extra": Payload()}, path)
    with pytest.raises(CheckpointError) as err:
        load_untrusted(path)
    assert not marker.exists()
    message = str(err.value)
    assert "refused" in message and "Nothing from the file was executed" in message
    assert "state_dict" in message and "evil.pth" in message
    # control: the payload is real, so the refusal above is what kept it from running
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_untrusted(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_untrusted(tmp_path / "missing.pth")


def test_small_image_stem_is_detected(tmp_path: Path) -> None:
    net = resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.eval()
    torch.save(net.state_dict(), tmp_path / "cifar.pth")
    obj = load_untrusted(tmp_path / "cifar.pth")
    backbone, head, meta = convert_checkpoint(obj, "resnet18")
    assert meta["small_images"] is True
    save_canonical(tmp_path / "teacher", backbone, head, meta)
    encoder, _ = load_canonical(tmp_path / "teacher.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder.features(x), tv_features(net, x))
    with pytest.raises(CheckpointError, match=r"conv1\.weight.*suggests --small-images"):
        convert_checkpoint(obj, "resnet18", small_images=False)


@pytest.mark.parametrize("arch,width", [("efficientnet_b0", 1280),
                                        ("mobilenetv3_small_050", 1024)])
def test_timm_plain_state_dict_drops_its_classifier(tmp_path: Path, arch: str, width: int
                                                    ) -> None:
    """The teacher's conversion of the families whose BatchNorms carry their activation:
    the canonical encoder computes the original network's pre-logits."""
    import timm

    torch.manual_seed(0)
    net = randomise(timm.create_model(arch, num_classes=7))
    torch.save(net.state_dict(), tmp_path / "effnet.pth")
    backbone, head, meta = convert_checkpoint(load_untrusted(tmp_path / "effnet.pth"), arch)
    assert meta["format"] == "torchvision" and meta["dropped"] == {"classifier.": 2}
    assert meta["feature_dim"] == width
    save_canonical(tmp_path / "t", backbone, head, meta)
    encoder, _ = load_canonical(tmp_path / "t.safetensors")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(encoder.features(x), net.forward_head(net.forward_features(x),
                                                                     pre_logits=True))


def test_swav_resnet50w2_layout_converts(tmp_path: Path) -> None:
    """A SWAV w2 checkpoint's keys and shapes (on the meta device: no memory) fit resnet50w2
    and are rejected by resnet50."""
    from test_models import swav_wide_resnet50_shapes

    state = {f"module.{k}": torch.empty(shape, device="meta")
             for k, shape in swav_wide_resnet50_shapes(2).items()}
    state.update({"module.projection_head.0.weight": torch.empty(8192, 4096, device="meta"),
                  "module.projection_head.0.bias": torch.empty(8192, device="meta"),
                  "module.projection_head.1.weight": torch.empty(8192, device="meta"),
                  "module.projection_head.1.bias": torch.empty(8192, device="meta"),
                  "module.projection_head.1.running_mean": torch.empty(8192, device="meta"),
                  "module.projection_head.1.running_var": torch.empty(8192, device="meta"),
                  "module.projection_head.3.weight": torch.empty(128, 8192, device="meta"),
                  "module.projection_head.3.bias": torch.empty(128, device="meta"),
                  "module.prototypes.weight": torch.empty(3000, 128, device="meta")})
    backbone, head, meta = convert_checkpoint(state, "resnet50w2")
    assert meta["format"] == "swav" and meta["feature_dim"] == 4096 and meta["embed_dim"] == 128
    assert meta["head_layout"] == [["linear", 4096, 8192, True], ["bn", 8192, True], ["relu"],
                                   ["linear", 8192, 128, True]]
    assert "1.num_batches_tracked" in head  # filled in: SWAV's release predates the counter
    with pytest.raises(CheckpointError, match=r"resnet50'.*conv1\.weight checkpoint "
                                              r"\(128, 3, 7, 7\) vs model \(64, 3, 7, 7\)"):
        convert_checkpoint(state, "resnet50")


def test_canonical_file_describes_itself(tmp_path: Path) -> None:
    case = make_moco(tmp_path, v2=True)
    backbone, head, meta = convert_checkpoint(load_untrusted(case.path), "resnet18")
    meta.update(source_path=str(case.path), source_sha256="abc")
    path = save_canonical(tmp_path / "out" / "teacher.safetensors", backbone, head, meta)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["seed_distill"])
        keys = set(f.keys())
    assert header == json.loads((tmp_path / "out" / "teacher.json").read_text())
    assert {k.split(".")[0] for k in keys} == {"backbone", "head"}
    (tmp_path / "out" / "teacher.json").unlink()
    assert read_canonical_meta(path) == header  # the lone file is enough
    encoder, _ = load_canonical(path)
    assert_same_encoder(encoder, case)
    # and it converts again (format seed_distill) to the same tensors
    again = load_untrusted(path)
    assert isinstance(again, CanonicalCheckpoint)
    backbone2, head2, meta2 = convert_checkpoint(again, "resnet18")
    assert meta2["format"] == "seed_distill" and meta2["head_layout"] == meta["head_layout"]
    assert all(torch.equal(backbone2[k], backbone[k]) for k in backbone)
    with pytest.raises(CheckpointError, match="records arch 'resnet18'.*--arch resnet18"):
        convert_checkpoint(again, "resnet34")


def test_canonical_directory_must_hold_one_file(tmp_path: Path) -> None:
    encoder = Encoder(create_backbone("resnet18"), build_head(mlp_layout(512, 16, 8)))
    save_encoder(tmp_path / "model", encoder)
    assert load_canonical(tmp_path)[1]["embed_dim"] == 8
    save_encoder(tmp_path / "teacher", encoder)
    with pytest.raises(CheckpointError, match="exactly one of teacher.safetensors"):
        load_canonical(tmp_path)


def test_plain_safetensors_state_dict_is_accepted(tmp_path: Path) -> None:
    net = resnet18(num_classes=5)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "plain.safetensors"))
    obj = load_untrusted(tmp_path / "plain.safetensors")
    assert not isinstance(obj, CanonicalCheckpoint)
    backbone, head, meta = convert_checkpoint(obj, "resnet18")
    assert meta["format"] == "torchvision" and not meta["head"]


def test_save_canonical_rejects_tensors_that_do_not_fit(tmp_path: Path) -> None:
    state = create_backbone("resnet18").state_dict()
    with pytest.raises(CheckpointError, match="resnet34"):
        save_canonical(tmp_path / "x", state, {}, {"format": "seed_distill", "arch": "resnet34"})
    with pytest.raises(ValueError, match="lacks \\['arch'\\]"):
        save_canonical(tmp_path / "x", state, {}, {"format": "seed_distill"})
    assert not list(tmp_path.iterdir())


def test_infer_head_layout_rules() -> None:
    head = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4, bias=False))
    layout, state = infer_head_layout(head.state_dict())
    assert layout == [["linear", 8, 6, True], ["relu"], ["linear", 6, 4, False]]
    assert set(state) == {"0.weight", "0.bias", "2.weight"}
    layout, state = infer_head_layout(nn.Linear(8, 4).state_dict())  # MoCo v1's bare fc
    assert layout == [["linear", 8, 4, True]] and set(state) == {"0.weight", "0.bias"}
    assert infer_head_layout({}) == (None, {})
    gap = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Dropout(), nn.Linear(6, 4)).state_dict()
    with pytest.raises(CheckpointError, match="2 parameter-free layers before index 3"):
        infer_head_layout(gap)
    with pytest.raises(CheckpointError, match="weight_g"):
        infer_head_layout({"0.weight_g": torch.zeros(4, 1), "0.weight_v": torch.zeros(4, 8)})
