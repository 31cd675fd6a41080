"""BatchNorm over the global batch keeps each module's own behaviour.

timm's MobileNetV3, EfficientNet and RegNet normalise with `BatchNormAct2d`, a BatchNorm that
applies its activation (and dropout) inside the module. A conversion that swaps it for a plain
BatchNorm trains another network (no activations) with more than one process. Here the
converted model must compute the original's function on one process, in eval and train mode,
for every family the project trains; the 1-vs-2-process equality is in test_train_stages.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from seed_core import distributed
from seed_core.distributed import (GlobalBatchNorm, GlobalBatchNormAct2d, UnknownBatchNormError,
                                   convert_sync_batchnorm)
from seed_core.models.encoder import build_encoder

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # CUDA: conversion only, nothing runs there

# (family, a model of it): every student family the project supports, and a model without BN
FAMILIES = {
    "timm resnet": lambda: build_encoder("resnet10t", True, 16),
    "timm resnet-d (the default teacher)": lambda: build_encoder("resnet18d", True, 16),
    "mobilenetv3 (the default student)": lambda: build_encoder("mobilenetv3_small_050", True, 16),
    "mobilenetv3 large": lambda: build_encoder("mobilenetv3_large_075", True, 16),
    "efficientnet": lambda: build_encoder("efficientnet_b0", True, 16),
    "regnet": lambda: build_encoder("regnetx_002", True, 16),
    "no batchnorm (convnext)": lambda: build_encoder("convnext_atto", False, 16),
    "torchvision resnet": lambda: torchvision.models.resnet18(num_classes=10),
    "torchvision mobilenetv3": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
}


def _batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _outputs(model: nn.Module, images: torch.Tensor, train: bool) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(0)  # the same dropout masks, if any
    with torch.no_grad():
        return model(images)


def _assert_same_function(original: nn.Module, converted: nn.Module, rtol: float = 1e-5) -> None:
    """Same outputs in eval and train mode, and the same running statistics after; `rtol`
    1e-5 for the same kernels, looser for other kernels (channels-last) that round otherwise."""
    images = torch.randn(4, 3, 32, 32)
    for train in (False, True):
        expected = _outputs(original, images, train)
        torch.testing.assert_close(_outputs(converted, images, train), expected,
                                   rtol=rtol, atol=rtol / 10 * float(expected.abs().max()))
    # the training passes moved the running statistics identically
    after, before = converted.state_dict(), original.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=rtol, atol=rtol / 100, msg=key)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_global_batchnorm_conversion_computes_the_same_function(family: str) -> None:
    torch.manual_seed(0)
    original = FAMILIES[family]()
    converted = convert_sync_batchnorm(copy.deepcopy(original), CPU)
    _assert_same_function(original, converted)
    norms = _batchnorms(converted)
    assert all(isinstance(m, GlobalBatchNorm) for m in norms.values())
    # each BatchNormAct2d became the global version with its activation, not a plain BN
    for name, m in _batchnorms(original).items():
        if hasattr(m, "act"):
            assert isinstance(norms[name], GlobalBatchNormAct2d)
            assert norms[name].act is m.act or type(norms[name].act) is type(m.act)


@pytest.mark.parametrize("family", ["mobilenetv3 (the default student)", "efficientnet",
                                    "regnet", "timm resnet"])
def test_the_cuda_conversion_keeps_the_activations(family: str) -> None:
    """On CUDA, timm's converter (SyncBatchNormAct carries act and drop); its eval-mode forward
    runs on CPU, where the module's function can be compared."""
    torch.manual_seed(0)
    original = FAMILIES[family]()
    converted = convert_sync_batchnorm(copy.deepcopy(original), CUDA)
    assert all(isinstance(m, nn.SyncBatchNorm) for m in _batchnorms(converted).values())
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(_outputs(converted, images, False),
                               _outputs(original, images, False))


def test_a_plain_swap_is_what_these_checks_catch() -> None:
    """The control: torch's own converter drops BatchNormAct2d's activation, and the comparison
    above fails on it by orders of magnitude."""
    torch.manual_seed(0)
    original = FAMILIES["mobilenetv3 (the default student)"]()
    swapped = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(original))
    with pytest.raises(AssertionError):
        _assert_same_function(original.eval(), swapped.eval())
    images = torch.randn(4, 3, 32, 32)
    gap = (_outputs(swapped, images, False) - _outputs(original, images, False)).abs().max()
    assert gap > 0.1  # unit-norm embeddings: a different network, not rounding


@pytest.mark.parametrize("unknown", [
    lambda: __import__("timm.layers", fromlist=["SplitBatchNorm2d"]).SplitBatchNorm2d(8),
    lambda: nn.LazyBatchNorm2d(),
])
def test_an_unknown_batchnorm_subclass_is_an_error_that_names_it(unknown) -> None:
    for device in (CPU, CUDA):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), unknown())
        name = type(model[1]).__qualname__
        with pytest.raises(UnknownBatchNormError, match=rf"1 \(.*{name}\)"):
            convert_sync_batchnorm(model, device)


def test_a_converted_model_is_not_converted_twice() -> None:
    model = convert_sync_batchnorm(FAMILIES["efficientnet"](), CPU)
    norms = _batchnorms(model)
    again = _batchnorms(convert_sync_batchnorm(model, CPU))
    assert all(again[name] is m for name, m in norms.items())


def _two_rank_worker(rank: int, store_path: str, results: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank,
                            world_size=2)
    try:
        torch.manual_seed(0)
        original = FAMILIES["mobilenetv3 (the default student)"]()
        for m in original.modules():  # momentum 0.1 and torch's cumulative average alike
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and "blocks.1" in str(m):
                m.momentum = None
        model = convert_sync_batchnorm(copy.deepcopy(original), CPU).train()
        # through the DDP wrapper the stages train with: it averages the ranks' gradients
        wrapped = distributed.wrap_ddp(model, distributed.Runtime(rank, 2, rank, CPU))
        assert wrapped is not model
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            out = wrapped(images[4 * rank:4 * rank + 4])
        out.square().sum().backward()
        grads = {n: 2 * p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[rank] = {"out": out.detach(), "state": model.state_dict(), "grads": grads}
    finally:
        dist.destroy_process_group()


def test_two_ranks_normalise_like_one_rank_on_the_whole_batch(tmp_path) -> None:
    """GlobalBatchNorm(Act2d) under DDP on two gloo ranks, each with half of the batch: the
    outputs, the running statistics (momentum 0.1 and cumulative) and the gradients are those
    of the original model on the whole batch in one process."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), results), nprocs=2)
        ranks = [results[0], results[1]]
    torch.manual_seed(0)
    original = FAMILIES["mobilenetv3 (the default student)"]()
    for m in original.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and "blocks.1" in str(m):
            m.momentum = None
    original.train()
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        out = original(images)
    out.square().sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(),
                               rtol=1e-4, atol=1e-5)
    for key, value in original.state_dict().items():
        for r in ranks:
            torch.testing.assert_close(r["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for name, p in original.named_parameters():
        # each rank's loss covers its half: the whole batch's gradient is the ranks' sum, twice
        # the mean that DDP leaves on every rank
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-3, atol=1e-5, msg=name)


# --- every other place that transforms a module (issue 15, point 3) ---------------------------

TRANSFORMED = ["mobilenetv3 (the default student)", "efficientnet"]


@pytest.mark.parametrize("family", TRANSFORMED)
def test_channels_last_computes_the_same_function(family: str) -> None:
    from seed_core.precision import channels_last

    torch.manual_seed(0)
    original = FAMILIES[family]()
    # oneDNN's NHWC kernels sum in another order: 6e-6 apart on unit-norm embeddings
    _assert_same_function(original, channels_last(copy.deepcopy(original)), rtol=1e-4)


@pytest.mark.parametrize("family", TRANSFORMED)
def test_precision_choice_and_autocast_keep_the_function(family: str) -> None:
    """`auto` keeps depthwise networks in fp32 on CPU; bf16 autocast, if chosen, computes the
    same embedding to bf16's precision (autocast changes dtypes, never modules)."""
    from seed_core.precision import autocast, resolve

    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    assert resolve("auto", CPU, model) == "fp32"
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
        with autocast(CPU, "bf16", model):
            low = model(images)
    assert [type(m) for m in model.modules()] == [type(m) for m in FAMILIES[family]().modules()]
    assert float(torch.nn.functional.cosine_similarity(low.float(), reference).min()) > 0.98


@pytest.mark.parametrize("family", TRANSFORMED)
def test_batchnorm_folding_of_the_benchmark_keeps_the_function(family: str) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from bench_levers import fold_batchnorm

    torch.manual_seed(0)
    backbone = FAMILIES[family]().backbone.eval()
    for m in backbone.modules():  # non-trivial statistics, as a trained network has
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fold_batchnorm(backbone)(images), backbone(images),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["mobilenetv3_small_050", "efficientnet_b0", "regnetx_002"])
def test_head_removal_keeps_timms_pre_logits(arch: str) -> None:
    """`create_backbone` drops the classifier only: its features are timm's pre-logits."""
    import timm

    from seed_core.models.backbones import create_backbone

    torch.manual_seed(0)
    full = timm.create_model(arch, num_classes=10).eval()
    backbone = create_backbone(arch).eval()
    backbone.load_state_dict({k: v for k, v in full.state_dict().items()
                              if not k.startswith(("classifier.", "head.fc."))}, strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = full.forward_head(full.forward_features(images), pre_logits=True)
        torch.testing.assert_close(backbone(images), expected)
    assert backbone.num_features == expected.shape[1]


@pytest.mark.parametrize("family", TRANSFORMED + ["regnet"])
def test_a_model_trained_with_global_batchnorm_saves_as_the_real_architecture(family: str,
                                                                              tmp_path) -> None:
    """The canonical file of a converted model loads strictly into the plain architecture and
    computes what the converted model computes (what the teacher stage and evaluation load)."""
    from seed_core.teachers.canonical import load_canonical, save_encoder

    torch.manual_seed(0)
    converted = convert_sync_batchnorm(FAMILIES[family](), CPU).eval()
    save_encoder(tmp_path / "model", converted, fmt="seed_distill")
    loaded, _ = load_canonical(tmp_path / "model.safetensors")
    assert not any(isinstance(m, GlobalBatchNorm) for m in loaded.modules())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), converted(images))
