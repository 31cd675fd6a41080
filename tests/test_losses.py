import pytest
import torch
import torch.nn.functional as F

from seed_core import losses
from seed_core.losses import infonce_loss, seed_agreement, seed_loss, target_off_positive


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def naive_seed_loss(s, t, queue, ts, tt) -> torch.Tensor:
    """SEED's loss written one sample at a time, straight from the paper's definition."""
    total = 0.0
    for i in range(s.shape[0]):
        bank = torch.cat([t[i:i + 1], queue])  # instances: own teacher embedding, then the queue
        p_teacher = torch.softmax((bank @ t[i]) / tt, dim=0)
        log_p_student = torch.log_softmax((bank @ s[i]) / ts, dim=0)
        total = total - (p_teacher * log_p_student).sum()
    return total / s.shape[0]


@pytest.mark.parametrize("tt", [1e-4, 0.01, 0.07, 1.0])
def test_seed_loss_matches_naive_loop(tt: float) -> None:
    s, t, q = unit(8, 16, seed=1), unit(8, 16, seed=2), unit(37, 16, seed=3)
    fast = seed_loss(s, t, q, 0.2, tt)
    slow = naive_seed_loss(s.double(), t.double(), q.double(), 0.2, tt)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5, abs=1e-5)


def test_seed_loss_gradient_matches_naive_loop() -> None:
    s, t, q = unit(6, 8, seed=4), unit(6, 8, seed=5), unit(20, 8, seed=6)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().double().requires_grad_(True)
    seed_loss(s1, t, q, 0.2, 0.05).backward()
    naive_seed_loss(s2, t.double(), q.double(), 0.2, 0.05).backward()
    torch.testing.assert_close(s1.grad, s2.grad.float(), rtol=1e-4, atol=1e-6)


def test_seed_loss_only_student_gets_gradients() -> None:
    s = unit(4, 8, seed=7).requires_grad_(True)
    t = unit(4, 8, seed=8).requires_grad_(True)
    q = unit(10, 8, seed=9).requires_grad_(True)
    seed_loss(s, t, q, 0.2, 0.01).backward()
    assert s.grad is not None and t.grad is None and q.grad is None


def test_cold_teacher_is_one_hot_on_the_positive() -> None:
    """As t_teacher -> 0 the target is one-hot on the positive: SEED becomes InfoNCE of the
    student against its own teacher embedding."""
    s, t, q = unit(8, 16, seed=10), unit(8, 16, seed=11), unit(50, 16, seed=12)
    cold = seed_loss(s, t, q, 0.2, 1e-6)
    expected = -F.log_softmax(torch.cat([(s * t).sum(1, keepdim=True), s @ q.T], 1) / 0.2,
                              dim=1)[:, 0].mean()
    assert cold.item() == pytest.approx(expected.item(), rel=1e-5)
    assert cold.item() == pytest.approx(infonce_loss(s, t, q, 0.2).item(), rel=1e-5)


def test_hot_teacher_target_is_uniform() -> None:
    s, t, q = unit(4, 16, seed=13), unit(4, 16, seed=14), unit(30, 16, seed=15)
    hot = seed_loss(s, t, q, 0.2, 1e6)
    logits = torch.cat([(s * t).sum(1, keepdim=True), s @ q.T], 1) / 0.2
    expected = -F.log_softmax(logits, dim=1).mean(1).mean()
    assert hot.item() == pytest.approx(expected.item(), rel=1e-4)


def test_seed_loss_is_minimal_when_student_equals_teacher_distribution() -> None:
    """With t_student == t_teacher the loss is the cross-entropy H(p_T, p_S) >= H(p_T),
    with equality at student == teacher."""
    t, q = unit(6, 16, seed=16), unit(40, 16, seed=17)
    at_teacher = seed_loss(t, t, q, 0.1, 0.1)
    other = seed_loss(unit(6, 16, seed=18), t, q, 0.1, 0.1)
    assert at_teacher < other
    p = F.softmax(torch.cat([(t * t).sum(1, keepdim=True), t @ q.T], 1).double() / 0.1, dim=1)
    entropy = -(p * p.log()).sum(1).mean()
    assert at_teacher.item() == pytest.approx(entropy.item(), rel=1e-5)


def test_seed_loss_falls_over_gradient_steps() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 10)
    teacher = F.normalize(torch.randn(32, 8), dim=1)
    q = unit(64, 8, seed=19)
    student = torch.nn.Linear(10, 8)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        loss = seed_loss(F.normalize(student(x), dim=1), teacher, q, 0.2, 0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_infonce_matches_naive_loop() -> None:
    qz, kz, queue = unit(5, 8, seed=20), unit(5, 8, seed=21), unit(12, 8, seed=22)
    expected = 0.0
    for i in range(5):
        logits = torch.cat([(qz[i] @ kz[i]).view(1), queue @ qz[i]]) / 0.2
        expected += -logits[0] + torch.logsumexp(logits, 0)
    assert infonce_loss(qz, kz, queue, 0.2).item() == pytest.approx(expected.item() / 5, rel=1e-5)


def test_agreement_counts_top1_matches() -> None:
    t = unit(4, 8, seed=23)
    q = unit(10, 8, seed=24)
    assert seed_agreement(t, t, q).item() == 1.0
    # a student that points at queue entry 0 agrees only where the teacher also prefers it
    s = q[:1].expand(4, -1).clone()
    teacher_top = torch.cat([(t * t).sum(1, keepdim=True), t @ q.T], 1).argmax(1)
    assert seed_agreement(s, t, q).item() == pytest.approx((teacher_top == 1).float().mean())


@pytest.mark.parametrize("tt", [0.005, 0.01, 0.1, 1.0])
def test_target_off_positive_matches_the_softmax(tt: float) -> None:
    t, q = unit(4, 8, seed=25), unit(15, 8, seed=26)
    logits = torch.cat([(t * t).sum(1, keepdim=True), t @ q.T], 1).double() / tt
    expected = F.softmax(logits, dim=1)[:, 1:].sum(1).mean().item()
    # at 0.005 and 0.01 the mass is far below float32 resolution near 1: 1 - p(positive) reads 0
    assert target_off_positive(t, q, tt).item() == pytest.approx(expected, rel=1e-3)


def test_target_off_positive_bounds_and_tiny_masses() -> None:
    t, q = unit(4, 8, seed=25), unit(15, 8, seed=26)
    # the paper's 1e-4: one-hot
    at_paper = target_off_positive(t, q, 1e-4).item()
    assert 0.0 <= at_paper < 1e-30
    assert target_off_positive(t, q, 1e6).item() == pytest.approx(15 / 16, rel=1e-4)
    # a queue entry equal to the positive holds half the mass at any temperature
    assert target_off_positive(t[:1], t[:1], 1e-4).item() == pytest.approx(0.5, rel=1e-3)


@pytest.mark.parametrize("tt", [1e-4, 0.01, 0.1])
def test_seed_loss_gradient_matches_naive_loop_with_soft_targets(tt: float) -> None:
    """Queue entries near the teacher embeddings make the target soft: the gradient computed in
    the forward pass must match autograd through the paper's per-sample definition."""
    t, noise = unit(6, 16, seed=30), unit(6, 16, seed=31)
    q = torch.cat([F.normalize(t + 0.002 * noise, dim=1), unit(40, 16, seed=32)])
    s = unit(6, 16, seed=33)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().double().requires_grad_(True)
    fast = seed_loss(s1, t, q, 0.2, tt)
    fast.backward()
    slow = naive_seed_loss(s2, t.double(), q.double(), 0.2, tt)
    slow.backward()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    torch.testing.assert_close(s1.grad, s2.grad.float(), rtol=1e-4, atol=1e-6)


def test_seed_loss_backward_scales_with_upstream_gradient_and_keeps_inputs() -> None:
    s, t, q = unit(5, 8, seed=34), unit(5, 8, seed=35), unit(30, 8, seed=36)
    before = [x.clone() for x in (s, t, q)]
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    seed_loss(s1, t, q, 0.2, 0.05).backward()
    (3.0 * seed_loss(s2, t, q, 0.2, 0.05)).backward()
    torch.testing.assert_close(s2.grad, 3.0 * s1.grad)
    for x, old in zip((s, t, q), before):
        assert torch.equal(x, old), "seed_loss must not write into its inputs"


def test_seed_loss_without_autocast_is_float32_and_needs_no_gradient() -> None:
    s, t, q = unit(4, 8, seed=37), unit(4, 8, seed=38), unit(20, 8, seed=39)
    exact = seed_loss(s.double(), t.double(), q.double(), 0.2, 1e-4)
    plain = seed_loss(s, t, q, 0.2, 1e-4)
    assert not plain.requires_grad and plain.dtype == torch.float32
    assert plain.item() == pytest.approx(exact.item(), rel=1e-5)


def teacher_in_bf16_loss(s, t, q, ts, tt) -> torch.Tensor:
    """The naive loss with the teacher's logits rounded to bf16: what keeping them out of
    float32 under autocast would give."""
    total = 0.0
    for i in range(s.shape[0]):
        bank = torch.cat([t[i:i + 1], q])
        p_teacher = torch.softmax((bank.bfloat16() @ t[i].bfloat16()).float() / tt, dim=0)
        total = total - (p_teacher * torch.log_softmax((bank @ s[i]) / ts, dim=0)).sum()
    return total / s.shape[0]


def test_teacher_target_is_float32_under_autocast() -> None:
    """Entries at cosine 0.99995-0.9998 to the teacher embedding keep weights e^-0.5..e^-2 at
    t_teacher 1e-4 only with float32 logits: bf16's spacing near 1 (2^-8) ties them."""
    t = unit(4, 64, seed=70)
    near = [F.normalize(t + eps * unit(4, 64, seed=71 + i), dim=1)
            for i, eps in enumerate((0.01, 0.014, 0.02))]
    q = torch.cat([*near, unit(30, 64, seed=75)])

    def target(dtype: torch.dtype) -> torch.Tensor:
        z, bank = t.to(dtype), q.to(dtype)
        logits = torch.cat([(z * z).sum(1, keepdim=True), z @ bank.T], 1)
        return torch.softmax(logits.double() / 1e-4, dim=1)

    exact, in_bf16 = target(torch.float64), target(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        target = losses._teacher_target(t, q, 1e-4)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target.double(), exact, rtol=0, atol=2e-3)  # fp32: 1e-7 x 1e4
    assert (in_bf16.double() - exact).abs().max() > 0.1  # the error this guards against


def test_seed_loss_under_autocast_keeps_the_teacher_target_in_float32() -> None:
    """Queue entries at cosine 0.9988-0.9996 to the teacher embedding get weights e^-4.5..e^-12
    at t_teacher 1e-4; in bf16 (spacing 2^-8 near 1) they would tie with the positive. The
    student's products may be bf16: the loss stays within 2e-3 of float32, while a bf16 target
    moves it by 1e-2."""
    t = unit(8, 64, seed=50)
    near = [F.normalize(t + eps * unit(8, 64, seed=51 + i), dim=1)
            for i, eps in enumerate((0.03, 0.04, 0.05))]
    q = torch.cat([*near, unit(100, 64, seed=60)])
    s = F.normalize(t - 20.0 * (near[0] - t), dim=1)  # leans away from the near entries
    s32, s16 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    full = seed_loss(s32, t, q, 0.2, 1e-4)
    full.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = seed_loss(s16, t, q, 0.2, 1e-4)
    mixed.backward()
    assert mixed.dtype == torch.float32
    assert abs(mixed.item() - full.item()) < 2e-3 * full.item()
    assert abs(teacher_in_bf16_loss(s, t, q, 0.2, 1e-4).item() - full.item()) > 1e-2 * full.item()
    torch.testing.assert_close(s16.grad, s32.grad, rtol=0.05, atol=0.05 * s32.grad.abs().max())


def test_seed_loss_buffer_reuse_path_equals_fresh_buffers(monkeypatch) -> None:
    """CPU softmaxes overwrite their logits; other devices take fresh buffers (`_in_place`):
    both paths give the same loss and gradient."""
    s, t, q = unit(6, 8, seed=40), unit(6, 8, seed=41), unit(25, 8, seed=42)
    results = []
    for in_place in (losses._in_place, lambda x: None):
        monkeypatch.setattr(losses, "_in_place", in_place)
        s1 = s.clone().requires_grad_(True)
        loss = seed_loss(s1, t, q, 0.2, 0.01)
        loss.backward()
        results.append((loss.detach(), s1.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


def test_seed_loss_calls_do_not_share_state() -> None:
    """The CPU path reuses scratch buffers between calls: a second call (other shapes, then the
    same) before the first one's backward must leave the first loss and gradient intact."""
    s, t, q = unit(6, 8, seed=80), unit(6, 8, seed=81), unit(30, 8, seed=82)
    alone = s.clone().requires_grad_(True)
    seed_loss(alone, t, q, 0.2, 0.05).backward()
    first = s.clone().requires_grad_(True)
    loss = seed_loss(first, t, q, 0.2, 0.05)
    value = loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seed_loss(unit(4, 8, seed=83).requires_grad_(True), t[:4], q[:20], 0.2, 0.05)
    seed_loss(unit(6, 8, seed=84).requires_grad_(True), t, q, 0.2, 0.05).backward()
    loss.backward()
    assert loss.item() == value
    torch.testing.assert_close(first.grad, alone.grad, rtol=0, atol=0)
