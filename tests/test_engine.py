"""Training steps: N gloo ranks on a split batch equal 1 process on the whole batch."""

import contextlib
import copy
import datetime
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from seed_core import distributed
from seed_core.evaluation.features import merge_by_index
from seed_core.models.backbones import create_backbone
from seed_core.models.encoder import Encoder
from seed_core.models.heads import build_head, mlp_layout
from seed_core.queue import EmbeddingQueue
from seed_core.train.distill import seed_step
from seed_core.train.moco import moco_step
from seed_core.train.schedule import cosine_with_warmup, scaled_lr

GLOBAL_BATCH, STEPS, SIZE = 8, 3, 16


def encoder(seed: int, out_dim: int = 16) -> Encoder:
    torch.manual_seed(seed)
    backbone = create_backbone("resnet10t")
    width = backbone.num_features
    return Encoder(backbone, build_head(mlp_layout(width, 32, out_dim)))


def global_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g) for _ in range(STEPS)]


def run_steps(kind: str, rank: int, world: int) -> dict:
    """STEPS optimisation steps of `kind` on this rank's slice of each global batch."""
    device = torch.device("cpu")
    rt = distributed.Runtime(rank, world, rank, device)
    per_rank = GLOBAL_BATCH // world
    student = encoder(0)
    # with shuffling BN the key encoder is copied before the conversion: its BatchNorms stay
    # local to each group of shuffled keys
    key = copy.deepcopy(student).requires_grad_(False)
    if world > 1:
        student = distributed.convert_sync_batchnorm(student, device)
    frozen = {"moco": copy.deepcopy(student).requires_grad_(False), "moco_shuffle_bn": key,
              "seed": encoder(1).eval().requires_grad_(False)}[kind]
    model = distributed.wrap_ddp(student, rt)
    queue = EmbeddingQueue(12, 16)  # 12 is not a multiple of the batch: wrap-around included
    queue.fill_random(torch.Generator().manual_seed(5))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    losses = []
    for step, images in enumerate(global_batches()):
        mine = images[rank * per_rank:(rank + 1) * per_rank]
        common = dict(optimizer=optimizer, scaler=None, gather=distributed.gather_cat,
                      amp=contextlib.nullcontext, where=f"test step {step}")
        if kind == "seed":
            out = seed_step(model, frozen, queue, [mine], t_student=0.2, t_teacher=0.05,
                            **common)
        else:
            flipped = torch.flip(mine, dims=[3])
            shuffle = dict(shuffle_bn_group=4, shuffle_seed=step, rank=rank, world_size=world) \
                if kind == "moco_shuffle_bn" else {}
            out = moco_step(model, frozen, queue, [mine, flipped], temperature=0.2,
                            key_momentum=0.9, **shuffle, **common)
        loss = torch.tensor([out["loss"]])
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
    state = {k: v.clone() for k, v in student.state_dict().items() if v.dtype.is_floating_point}
    return {"losses": losses, "state": state, "queue": queue.buffer.clone(), "ptr": queue.ptr}


def _worker(rank: int, world: int, port: int, kind: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    result = run_steps(kind, rank, world)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["seed", "moco", "moco_shuffle_bn"])
def test_two_gloo_ranks_equal_one_process(tmp_path: Path, kind: str) -> None:
    single = run_steps(kind, 0, 1)
    out = tmp_path / "two.pt"
    mp.spawn(_worker, args=(2, free_port(), kind, str(out)), nprocs=2, join=True)
    double = torch.load(out, weights_only=True)
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)
    assert double["ptr"] == single["ptr"]
    torch.testing.assert_close(double["queue"], single["queue"], rtol=1e-4, atol=1e-5)
    assert double["state"].keys() == single["state"].keys()
    for name, value in single["state"].items():
        torch.testing.assert_close(double["state"][name], value, rtol=1e-4, atol=1e-5,
                                   msg=name)
    # and the steps did train: the weights moved
    assert single["losses"][0] != single["losses"][-1]


def test_shuffled_keys_normalise_each_group_of_the_shuffled_batch() -> None:
    """Against a naive reference: permute the global batch, forward each group of `group`
    samples alone, put the keys back; each rank returns its own samples' keys."""
    from seed_core.train.moco import shuffled_keys

    torch.manual_seed(0)
    key_encoder = encoder(0).train()
    images = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(8, generator=torch.Generator().manual_seed(42))
    with torch.no_grad():
        expected = torch.empty(8, 16)
        for part in order.split(4):
            expected[part] = copy.deepcopy(key_encoder)(images[part])
        keys = shuffled_keys(copy.deepcopy(key_encoder), images, group=4, shuffle_seed=42,
                             gather=lambda x: x)
        torch.testing.assert_close(keys, expected)
        # without the shuffle, the batch is normalised at once: other keys, the control
        plain = shuffled_keys(copy.deepcopy(key_encoder), images, group=0, shuffle_seed=42,
                              gather=lambda x: x)
        assert (plain - expected).abs().max() > 1e-2
        # rank 1 of 2 sees the gathered batch and returns the keys of its own half
        halves = [images[:4], images[4:]]
        rank1 = shuffled_keys(copy.deepcopy(key_encoder), halves[1], group=4, shuffle_seed=42,
                              gather=lambda x: torch.cat([halves[0], x] if x.shape[1] == 3
                                                         else [expected[order[:4]], x]),
                              rank=1, world_size=2)
        torch.testing.assert_close(rank1, expected[4:])
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        shuffled_keys(key_encoder, images, group=3, shuffle_seed=0, gather=lambda x: x)


def test_nan_loss_stops_with_a_clear_error() -> None:
    student, teacher = encoder(0), encoder(1).eval()
    queue = EmbeddingQueue(12, 16)
    queue.buffer.fill_(float("nan"))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="loss is nan at distill epoch 2 step 7"):
        seed_step(student, teacher, queue, [torch.randn(4, 3, SIZE, SIZE)], t_student=0.2,
                  t_teacher=0.01, optimizer=optimizer, scaler=None, gather=lambda x: x,
                  amp=contextlib.nullcontext, where="distill epoch 2 step 7")


def nan_gradients(parameter: torch.nn.Parameter, times: int) -> list[int]:
    """A gradient hook (the fault, from outside the step) that spoils the first `times`
    gradients of `parameter` with NaN in a few entries, as oneDNN's bf16 kernel did."""
    calls = [0]

    def spoil(grad: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > times:
            return grad
        grad = grad.clone()
        grad.view(-1)[:3] = float("nan")
        return grad

    parameter.register_hook(spoil)
    return calls


def test_a_nonfinite_gradient_skips_the_step_with_a_warning(caplog) -> None:
    views = [torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))]

    def step(times: int | None) -> tuple[Encoder, Encoder]:
        student, teacher = encoder(0), encoder(1).eval()
        before = copy.deepcopy(student)
        queue = EmbeddingQueue(12, 16)
        queue.fill_random(torch.Generator().manual_seed(0))
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        if times is not None:
            nan_gradients(next(student.backbone.parameters()), times)
        seed_step(student, teacher, queue, views, t_student=0.2, t_teacher=0.01,
                  optimizer=optimizer, scaler=None, gather=lambda x: x,
                  amp=contextlib.nullcontext, where="distill epoch 0 step 3")
        return before, student

    before, clean = step(None)
    assert not all(torch.equal(a, b) for a, b in zip(before.parameters(), clean.parameters()))
    before, spoiled = step(1)
    # no NaN reaches the weights: the step left every parameter as it was
    for a, b in zip(before.parameters(), spoiled.parameters()):
        assert torch.equal(a, b)
    assert "non-finite gradient at distill epoch 0 step 3 in 1 parameter tensor(s)" in caplog.text
    assert "step skipped" in caplog.text


def test_small_patches_add_a_second_queue_loss() -> None:
    student, teacher = encoder(0), encoder(1).eval()
    queue, small = EmbeddingQueue(12, 16), EmbeddingQueue(12, 16)
    queue.fill_random(torch.Generator().manual_seed(1))
    small.fill_random(torch.Generator().manual_seed(2))
    before = small.buffer.clone()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    views = [torch.randn(4, 3, SIZE, SIZE), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    out = seed_step(student, teacher, queue, views, t_student=0.2, t_teacher=0.01,
                    optimizer=optimizer, scaler=None, gather=lambda x: x,
                    amp=contextlib.nullcontext, where="t", small_queue=small)
    assert small.ptr == 4 and not torch.equal(small.buffer[:4], before[:4])
    with torch.no_grad():  # the first patch of each image is what the patch queue keeps
        torch.testing.assert_close(small.buffer[:4], teacher(views[1]))
    assert out["loss"] > 0 and 0.0 <= out["agreement"] <= 1.0


def test_cosine_schedule_with_warmup() -> None:
    f = cosine_with_warmup(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5)
    assert f(99) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert scaled_lr(0.03, 512) == pytest.approx(0.06)


def test_compute_threads_leave_the_loader_workers_their_cores() -> None:
    assert distributed.compute_threads(2, 1, 1) == 1  # this machine, data.workers 1
    assert distributed.compute_threads(2, 1, 0) == 2  # the main process loads between steps
    assert distributed.compute_threads(16, 1, 14) == 2  # one GPU rank, 14 workers
    assert distributed.compute_threads(16, 8, 1) == 1
    assert distributed.compute_threads(2, 2, 1) == 1  # never fewer than one


def test_seeds_released_schedule() -> None:
    """SEED's `adjust_learning_rate` (lr_mult 1): the base rate for the warm-up epochs, then a
    cosine of the epoch over all epochs, constant within an epoch."""
    from seed_core.train.schedule import Schedule

    def released(epoch: int, epochs: int = 10, warmup: int = 2) -> float:
        return 1.0 if epoch < warmup else 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))

    schedule = Schedule(epochs=10, steps_per_epoch=7, global_batch=256, base_lr=0.03,
                        momentum=0.9, weight_decay=1e-4, warmup_epochs=2, kind="seed")
    f = schedule.multiplier()
    assert [f(step) for step in range(70)] == [released(step // 7) for step in range(70)]
    assert f(13) == 1.0 and f(14) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    # this project's default differs: per step, from ~0, down to ~0 at the end
    ours = Schedule(10, 7, 256, 0.03, 0.9, 1e-4, 2).multiplier()
    assert ours(0) == pytest.approx(1 / 14) and ours(69) < 0.001 < released(9)


def test_merge_by_index_orders_and_rejects_duplicates() -> None:
    a = (torch.tensor([[1.0], [3.0]]), torch.tensor([1, 3]), torch.tensor([1, 3]))
    b = (torch.tensor([[0.0], [2.0]]), torch.tensor([0, 2]), torch.tensor([0, 2]))
    feats, labels, index = merge_by_index([a, b])
    assert index.tolist() == [0, 1, 2, 3] and feats.squeeze(1).tolist() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="seen twice"):
        merge_by_index([a, a])


def test_torchrun_with_one_process_joins_a_process_group(tmp_path: Path) -> None:
    """One process under torchrun joins a (gloo here, NCCL on a GPU) group, so a one-GPU run
    initialises the backend as a multi-GPU run does; run without torchrun, it joins none."""
    import os
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text("from seed_core import distributed\n"
                      "rt = distributed.setup()\n"
                      "print('group', distributed.is_initialized(), rt.world_size)\n"
                      "distributed.barrier()\n"
                      "distributed.cleanup()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    plain = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 0 and "group False 1" in plain.stdout, plain.stderr
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "1", str(script)], env=env,
                              capture_output=True, text=True, timeout=120)
    assert launched.returncode == 0 and "group True 1" in launched.stdout, launched.stderr
