"""Every known teacher checkpoint layout, one module per family. Each module's `FORMATS` lists
its `TeacherFormat`s: a `detect` predicate that looks only at keys and an `extract` that returns
the backbone and head tensors with their prefixes removed. Detection tries the most specific
layouts first; a plain state dict (`torchvision`) comes last."""

from __future__ import annotations

from typing import Any

from seed_core.teachers.common import CheckpointError, TeacherFormat, describe
from seed_core.teachers.formats import (barlow_twins, dino, moco, seed, seed_distill, simclr,
                                        solo_learn, swav, torchvision, vissl)

# detection order: most specific first; `torchvision` (any plain state dict) comes last
DETECTION_ORDER: list[TeacherFormat] = [
    *seed_distill.FORMATS,
    *dino.FORMATS,
    *vissl.FORMATS,
    *barlow_twins.FORMATS,
    *moco.FORMATS,
    *seed.FORMATS,
    *solo_learn.FORMATS,
    *swav.FORMATS,
    *simclr.FORMATS,
    *torchvision.FORMATS,
]
FORMATS: dict[str, TeacherFormat] = {f.name: f for f in DETECTION_ORDER}


def known_formats() -> list[str]:
    """Format names in detection order."""
    return list(FORMATS)


def detect_format(obj: Any) -> str:
    """The first format whose `detect` accepts `obj`; an error lists the known formats."""
    for fmt in DETECTION_ORDER:
        if fmt.detect(obj):
            return fmt.name
    raise CheckpointError(f"unrecognised checkpoint layout ({describe(obj)}); known formats: "
                          f"{', '.join(known_formats())}. If it holds weights under other keys, "
                          "save that state dict on its own (torch.save(ckpt['KEY'], 'plain.pth')) "
                          "and pass the plain file")
