"""One SEED step (Fang et al. 2021): the student mimics the frozen teacher's similarity
distribution over [own teacher embedding, queue]; then the teacher embeddings are enqueued."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from seed_core.losses import seed_agreement, seed_loss, target_off_positive
from seed_core.train.step import backward_step, check_finite


def seed_step(student: torch.nn.Module, teacher: torch.nn.Module, queue: Any,
              views: list[torch.Tensor], *, t_student: float, t_teacher: float,
              optimizer: torch.optim.Optimizer, scaler: Any, gather: Callable,
              amp: Callable[[], contextlib.AbstractContextManager], where: str,
              small_queue: Any = None, with_stats: bool = True,
              teacher_amp: Callable[[], contextlib.AbstractContextManager] | None = None
              ) -> dict[str, float]:
    """One SEED step. `views[0]` is the global view both networks see; `views[1:]` are SEED's
    optional small patches, distilled against their own queue (one patch per image enqueued).

    `student` may be DDP-wrapped; `teacher` is frozen, in eval mode, outside DDP, and runs under
    `teacher_amp` when given (its best precision may differ from the student's, see
    `seed_core.precision`). The monitoring values (agreement, target mass off the positive)
    cost extra B x K products: ask for them only when logging.
    """
    image, patches = views[0], views[1:]
    with torch.no_grad(), (teacher_amp or amp)():
        teacher_z = teacher(image).float()
        teacher_p = teacher(torch.cat(patches)).float() if patches else None
    with amp():
        student_z = student(image).float()
        student_p = student(torch.cat(patches)).float() if patches else None
        # under the student's autocast, so that its B x K products run in its precision (the
        # teacher's logits stay float32 inside seed_loss)
        loss = seed_loss(student_z, teacher_z, queue.buffer, t_student, t_teacher)
        if patches:
            loss = loss + seed_loss(student_p, teacher_p, small_queue.buffer, t_student,
                                    t_teacher)
    check_finite(loss, where)
    optimizer.zero_grad(set_to_none=True)
    backward_step(loss, optimizer, scaler, where)
    metrics = {"loss": loss.item()}
    if with_stats:
        metrics["agreement"] = seed_agreement(student_z.detach(), teacher_z, queue.buffer).item()
        metrics["target_off_positive"] = target_off_positive(teacher_z, queue.buffer,
                                                             t_teacher).item()
    queue.enqueue(gather(teacher_z))
    if patches:
        # the first patch of every image stands for its image in the patch queue
        small_queue.enqueue(gather(teacher_p[:image.shape[0]]))
    return metrics


