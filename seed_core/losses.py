"""Loss functions: pure tensor functions; the queue comes in as an argument."""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def seed_loss(student_z: torch.Tensor, teacher_z: torch.Tensor, queue: torch.Tensor,
              t_student: float, t_teacher: float) -> torch.Tensor:
    """SEED's soft cross-entropy between teacher and student similarity distributions.

    Over the instances [own teacher embedding, queue]: the teacher's target is
    `softmax([t.t, t.Q] / t_teacher)`, the student's prediction `softmax([s.t, s.Q] / t_student)`;
    the loss is `-sum p_T log p_S`, averaged over the batch.

    Precision: the teacher's logits are float32 always (near 1 / t_teacher = 1e4, fp16 and bf16
    keep no digit of them). Under autocast the student's two `B x K` products (its logits and
    their gradient) run in the autocast dtype, as the released code's AMP ran them, with the
    positives, softmaxes and sums in float32; without autocast everything is float32.

    Args:
        student_z: `(B, D)` L2-normalised student embeddings (gradients flow here only).
        teacher_z: `(B, D)` L2-normalised teacher embeddings of the same views.
        queue: `(K, D)` L2-normalised teacher embeddings of earlier batches.
        t_student: student temperature (paper: 0.2).
        t_teacher: teacher temperature (paper: 1e-4, i.e. nearly one-hot on the positive).

    Returns:
        Scalar loss.
    """
    device = student_z.device.type
    low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return _SeedCrossEntropy.apply(student_z, teacher_z.detach(), queue.detach(), t_student,
                                   t_teacher, low)


# Scratch buffers of seed_loss, kept between calls on CPU, per thread (see `_scratch`); a few
# sets at most (the global queue's and the small patches').
_SCRATCH = threading.local()
_SCRATCH_MAX = 6


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """An uninitialised buffer; on CPU the same one for every call with the same name, shape and
    dtype. A fresh `(B, 1 + K)` float32 buffer page-faults on every step (K = 65,536, B = 256:
    64 MiB, ~30 ms per buffer on one core, 40% of the loss); elsewhere a new one (CUDA's caching
    allocator already reuses memory). Per thread, so concurrent callers never share one."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    kept = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, tuple(shape), dtype)
    if key not in kept:
        if len(kept) >= _SCRATCH_MAX:
            kept.clear()
        kept[key] = torch.empty(shape, dtype=dtype)
    return kept[key]


def _logits(z: torch.Tensor, teacher_z: torch.Tensor, queue: torch.Tensor, temperature: float,
            name: str) -> torch.Tensor:
    """`[z.t, z.Q] / T` as one `(B, 1 + K)` float32 buffer (scratch `name`), the positive in
    column 0.

    The queue's product is written straight into the buffer (no concatenation copy), and the
    temperature scales the `(B, D)` operand rather than the `(B, K)` product. A `queue` of a
    lower dtype makes the product in that dtype (then widened into the buffer); the positive
    stays float32.
    """
    scaled = z / temperature
    batch, size = z.shape[0], queue.shape[0]
    out = _scratch(name, (batch, 1 + size), torch.float32, z.device)
    out[:, 0] = (scaled * teacher_z).sum(1)
    if queue.dtype == torch.float32:
        torch.mm(scaled, queue.T, out=out[:, 1:])
    else:
        low = _scratch(f"{name}_low", (batch, size), queue.dtype, z.device)
        out[:, 1:] = torch.mm(scaled.to(queue.dtype), queue.T, out=low)
    return out


def _teacher_target(teacher_z: torch.Tensor, queue: torch.Tensor,
                    t_teacher: float) -> torch.Tensor:
    """The teacher's target `softmax([t.t, t.Q] / t_teacher)`, `(B, 1 + K)`, from float32 logits
    whatever the inputs' dtype or the autocast state (call it with autocast off). On CPU the
    result is a scratch buffer, valid until the next call."""
    t = teacher_z.float()
    logits = _logits(t, t, queue.float(), t_teacher, "teacher")
    return torch.softmax(logits, 1, out=_in_place(logits))


def _in_place(x: torch.Tensor) -> torch.Tensor | None:
    """`out=` for a row-wise softmax over `x` itself on CPU (a scratch buffer, see `_scratch`);
    elsewhere a new buffer."""
    return x if x.device.type == "cpu" else None


class _SeedCrossEntropy(torch.autograd.Function):
    """`seed_loss` with its gradient computed in the forward pass.

    d loss / d logit_S = (softmax(logit_S) - p_T) / B, so the gradient w.r.t. the student
    embeddings is `((q_S - p_T) [t; Q]) / (t_student B)`: one `(B, K) x (K, D)` product. The
    work is the floor of the loss (two `(B, D) x (D, K)` products, both softmaxes, that one
    product) over two `(B, 1 + K)` buffers reused in place, and only the `(B, D)` gradient is
    kept for the backward pass: autograd's version stores and re-reads several `(B, K)`
    intermediates, which made the loss cost 4.2x this at K = 65,536, B = 256 on CPU (fp32).
    """

    @staticmethod
    def forward(ctx: Any, student_z: torch.Tensor, teacher_z: torch.Tensor, queue: torch.Tensor,
                t_student: float, t_teacher: float, low: torch.dtype | None) -> torch.Tensor:
        with torch.autocast(student_z.device.type, enabled=False):
            s, t, q = student_z.float(), teacher_z.float(), queue.float()
            batch = s.shape[0]
            p_teacher = _teacher_target(t, q, t_teacher)
            # the student's products in the autocast dtype (bf16: 3x faster on this CPU)
            q_student = q.to(low) if low is not None else q
            logits_s = _logits(s, t, q_student, t_student, "student")
            log_q = torch.log_softmax(logits_s, 1, out=_in_place(logits_s))
            # one (B, 1, 1 + K) x (B, 1 + K, 1) product per row: a dot without a temporary
            loss = -torch.bmm(p_teacher.unsqueeze(1), log_q.unsqueeze(2)).sum() / batch
            if ctx.needs_input_grad[0]:
                diff = log_q.exp_().sub_(p_teacher)  # q_S - p_T, (B, 1 + K)
                over_queue = diff[:, 1:]
                if low is not None:  # into the low-precision buffer the logits are done with
                    over_queue = _scratch("student_low", over_queue.shape, low,
                                          s.device).copy_(over_queue)
                grad = torch.mm(over_queue, q_student).float()
                grad.addcmul_(diff[:, :1], t).div_(t_student * batch)
                ctx.save_for_backward(grad.to(student_z.dtype))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None


def seed_agreement(student_z: torch.Tensor, teacher_z: torch.Tensor,
                   queue: torch.Tensor) -> torch.Tensor:
    """How often the student's most similar instance in [positive, queue] is the teacher's.

    Returns a scalar in [0, 1]; 1 means the student ranks instances as the teacher does at top-1.
    """
    with torch.no_grad():
        def top1(z: torch.Tensor) -> torch.Tensor:
            pos = (z * teacher_z).sum(1, keepdim=True)
            neg = z @ queue.T
            best_neg, idx = neg.max(1, keepdim=True)
            return torch.where(pos >= best_neg, torch.zeros_like(idx), idx + 1).squeeze(1)

        return (top1(student_z) == top1(teacher_z)).float().mean()


def infonce_loss(query_z: torch.Tensor, key_z: torch.Tensor, queue: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: each query's positive is its own key, the negatives are the queue.

    Args:
        query_z: `(B, D)` L2-normalised query embeddings (gradients flow here).
        key_z: `(B, D)` L2-normalised key embeddings from the momentum encoder.
        queue: `(K, D)` L2-normalised keys of earlier batches.
        temperature: MoCo-v2 uses 0.2.
    """
    key_z = key_z.detach()
    pos = (query_z * key_z).sum(1, keepdim=True)
    neg = query_z @ queue.detach().T
    logits = torch.cat([pos, neg], dim=1).float() / temperature
    target = torch.zeros(query_z.shape[0], dtype=torch.long, device=query_z.device)
    return F.cross_entropy(logits, target)


def target_off_positive(teacher_z: torch.Tensor, queue: torch.Tensor,
                        t_teacher: float) -> torch.Tensor:
    """Mean mass of the teacher's target `softmax([t.t, t.Q] / t_teacher)` outside the positive.

    How much of SEED's target is "similarity to other instances" rather than "this is me": about
    0 at the paper's t_teacher = 1e-4 (the target is one-hot and SEED is InfoNCE with the
    teacher's embedding as the positive), growing towards K / (K + 1) as t_teacher grows.
    Computed as exp(logsumexp(queue logits) - logsumexp(all logits)), so tiny masses keep their
    digits instead of rounding to 1 - 1.
    """
    with torch.no_grad():
        positive = (teacher_z * teacher_z).sum(1, keepdim=True).float() / t_teacher
        others = (teacher_z @ queue.T).float() / t_teacher
        log_off = others.logsumexp(1) - torch.cat([positive, others], 1).logsumexp(1)
        return log_off.double().exp().mean()
