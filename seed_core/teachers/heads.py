"""Rebuilding a checkpoint's projection head from its keys and shapes alone."""

from __future__ import annotations

from typing import Mapping

import torch

from seed_core.models.heads import Layout
from seed_core.teachers.common import CheckpointError, show_keys


def infer_head_layout(head_state: Mapping[str, torch.Tensor], activation: str = "relu"
                      ) -> tuple[Layout | None, dict[str, torch.Tensor]]:
    """Rebuild a head's layout from its keys and shapes and re-index its tensors.

    Keys are `{index}.{param}` of a numbered Sequential (or bare `weight`/`bias` of a single
    Linear). A layer with `running_mean` is a BatchNorm1d (affine when it has a weight), a 2-D
    weight is a Linear; each one-index gap between parametrised layers is an `activation`.

    Returns:
        (layout or None when there is no head, tensors keyed by our Sequential's indices)
    """
    if not head_state:
        return None, {}
    groups: dict[int, dict[str, torch.Tensor]] = {}
    bare = [k for k in head_state if "." not in k]
    if bare and len(bare) != len(head_state):
        raise CheckpointError(f"head: mixes bare keys ({show_keys(bare)}) with indexed ones")
    for key, value in head_state.items():
        index, _, param = (f"0.{key}" if bare else key).partition(".")
        if not index.isdigit() or param not in ("weight", "bias", "running_mean", "running_var",
                                                "num_batches_tracked"):
            raise CheckpointError(f"head: cannot read key '{key}' (supported: Linear and "
                                  "BatchNorm1d layers of a numbered Sequential)")
        groups.setdefault(int(index), {})[param] = value
    layout: Layout = []
    state: dict[str, torch.Tensor] = {}
    previous = -1
    for index in sorted(groups):
        gap = index - previous - 1
        if gap == 1 and previous >= 0:
            layout.append([activation])
        elif gap != 0:
            raise CheckpointError(f"head: cannot infer the {gap} parameter-free layers before "
                                  f"index {index} (only a single activation between layers)")
        params = groups[index]
        position = len(layout)
        if "running_mean" in params:
            affine = "weight" in params
            layout.append(["bn", int(params["running_mean"].shape[0]), affine])
        elif "weight" in params and params["weight"].dim() == 2:
            out_dim, in_dim = params["weight"].shape
            layout.append(["linear", int(in_dim), int(out_dim), "bias" in params])
        else:
            raise CheckpointError(f"head: layer {index} with {sorted(params)} is neither a "
                                  "Linear nor a BatchNorm1d")
        for param, value in params.items():
            state[f"{position}.{param}"] = value
        previous = index
    return layout, state


