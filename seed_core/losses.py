"""Loss functions: pure tensor functions; the queue comes in as an argument."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def seed_loss(student_z: torch.Tensor, teacher_z: torch.Tensor, queue: torch.Tensor,
              t_student: float, t_teacher: float) -> torch.Tensor:
    """SEED's soft cross-entropy between teacher and student similarity distributions.

    Over the instances [own teacher embedding, queue]: the teacher's target is
    `softmax([t.t, t.Q] / t_teacher)`, the student's prediction `softmax([s.t, s.Q] / t_student)`;
    the loss is `-sum p_T log p_S`, averaged over the batch.

    Args:
        student_z: `(B, D)` L2-normalised student embeddings (gradients flow here only).
        teacher_z: `(B, D)` L2-normalised teacher embeddings of the same views.
        queue: `(K, D)` L2-normalised teacher embeddings of earlier batches.
        t_student: student temperature (paper: 0.2).
        t_teacher: teacher temperature (paper: 1e-4, i.e. nearly one-hot on the positive).

    Returns:
        Scalar loss.
    """
    teacher_z = teacher_z.detach()
    queue = queue.detach()
    # the positive and the queue are kept apart (no (B, K+1) concatenation): one matmul per
    # logit set, and the teacher's half never enters the autograd graph
    with torch.no_grad():
        t_pos = (teacher_z * teacher_z).sum(1, keepdim=True).float() / t_teacher
        t_neg = (teacher_z @ queue.T).float() / t_teacher
        t_norm = torch.logaddexp(t_pos, torch.logsumexp(t_neg, dim=1, keepdim=True))
        p_pos = (t_pos - t_norm).exp()  # (B, 1)
        p_neg = (t_neg - t_norm).exp()  # (B, K)
    s_pos = (student_z * teacher_z).sum(1, keepdim=True).float() / t_student
    s_neg = (student_z @ queue.T).float() / t_student
    s_norm = torch.logaddexp(s_pos, torch.logsumexp(s_neg, dim=1, keepdim=True))
    # sum(p) = 1, so -sum p (s - norm) = norm - sum p s
    cross_entropy = s_norm.squeeze(1) - (p_pos * s_pos).squeeze(1) - (p_neg * s_neg).sum(1)
    return cross_entropy.mean()


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


def queue_entropy(teacher_z: torch.Tensor, queue: torch.Tensor, t_teacher: float) -> torch.Tensor:
    """Mean entropy (nats) of the teacher's target distribution over [positive, queue]."""
    with torch.no_grad():
        logits = torch.cat([(teacher_z * teacher_z).sum(1, keepdim=True), teacher_z @ queue.T],
                           dim=1).float() / t_teacher
        logp = F.log_softmax(logits, dim=1)
        return -(logp.exp() * logp).sum(1).mean()
