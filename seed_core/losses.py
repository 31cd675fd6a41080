"""Loss functions: pure tensor functions; the queue comes in as an argument."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def seed_loss(student_z: torch.Tensor, teacher_z: torch.Tensor, queue: torch.Tensor,
              t_student: float, t_teacher: float) -> torch.Tensor:
    """SEED's soft cross-entropy between teacher and student similarity distributions.

    Over the instances [own teacher embedding, queue]: the teacher's target is
    `softmax([t.t, t.Q] / t_teacher)`, the student's prediction `softmax([s.t, s.Q] / t_student)`;
    the loss is `-sum p_T log p_S`, averaged over the batch. Computed in float32 whatever the
    autocast state (teacher logits near 1 / t_teacher = 1e4 lose every digit in fp16).

    Args:
        student_z: `(B, D)` L2-normalised student embeddings (gradients flow here only).
        teacher_z: `(B, D)` L2-normalised teacher embeddings of the same views.
        queue: `(K, D)` L2-normalised teacher embeddings of earlier batches.
        t_student: student temperature (paper: 0.2).
        t_teacher: teacher temperature (paper: 1e-4, i.e. nearly one-hot on the positive).

    Returns:
        Scalar loss.
    """
    return _SeedCrossEntropy.apply(student_z, teacher_z.detach(), queue.detach(), t_student,
                                   t_teacher)


def _logits(z: torch.Tensor, teacher_z: torch.Tensor, queue: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """`[z.t, z.Q] / T` as one `(B, 1 + K)` float32 buffer, the positive in column 0.

    The queue's product is written straight into the buffer (no concatenation copy), and the
    temperature scales the `(B, D)` operand rather than the `(B, K)` product.
    """
    scaled = z / temperature
    out = torch.empty(z.shape[0], 1 + queue.shape[0], dtype=torch.float32, device=z.device)
    out[:, 0] = (scaled * teacher_z).sum(1)
    torch.mm(scaled, queue.T, out=out[:, 1:])
    return out


def _in_place(x: torch.Tensor) -> torch.Tensor | None:
    """`out=` for a row-wise softmax over `x` itself: on CPU, where a fresh `(B, 1 + K)` buffer
    page-faults on every step (K = 65,536: 64 MiB per batch of 256); elsewhere a new buffer
    (CUDA's caching allocator makes it free)."""
    return x if x.device.type == "cpu" else None


class _SeedCrossEntropy(torch.autograd.Function):
    """`seed_loss` with its gradient computed in the forward pass.

    d loss / d logit_S = (softmax(logit_S) - p_T) / B, so the gradient w.r.t. the student
    embeddings is `((q_S - p_T) [t; Q]) / (t_student B)`: one `(B, K) x (K, D)` product. The
    work is the floor of the loss (two `(B, D) x (D, K)` products, both softmaxes, that one
    product) over two `(B, 1 + K)` buffers reused in place, and only the `(B, D)` gradient is
    kept for the backward pass: autograd's version stores and re-reads several `(B, K)`
    intermediates, which made the step's B x K part cost 3.5x this at K = 65,536 on CPU.
    """

    @staticmethod
    def forward(ctx: Any, student_z: torch.Tensor, teacher_z: torch.Tensor, queue: torch.Tensor,
                t_student: float, t_teacher: float) -> torch.Tensor:
        with torch.autocast(student_z.device.type, enabled=False):
            s, t, q = student_z.float(), teacher_z.float(), queue.float()
            batch = s.shape[0]
            logits_t = _logits(t, t, q, t_teacher)
            p_teacher = torch.softmax(logits_t, 1, out=_in_place(logits_t))
            logits_s = _logits(s, t, q, t_student)
            log_q = torch.log_softmax(logits_s, 1, out=_in_place(logits_s))
            # one (B, 1, 1 + K) x (B, 1 + K, 1) product per row: a dot without a temporary
            loss = -torch.bmm(p_teacher.unsqueeze(1), log_q.unsqueeze(2)).sum() / batch
            if ctx.needs_input_grad[0]:
                diff = log_q.exp_().sub_(p_teacher)  # q_S - p_T, (B, 1 + K)
                grad = torch.mm(diff[:, 1:], q).addcmul_(diff[:, :1], t)
                ctx.save_for_backward(grad.div_(t_student * batch).to(student_z.dtype))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


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
