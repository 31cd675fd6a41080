"""Projection heads described by a *layout*, a JSON-able list of layers, so a checkpoint's head
can be rebuilt from its metadata alone:

    [["linear", 512, 512, true], ["relu"], ["linear", 512, 128, true]]

Entries: `["linear", in, out, bias]`, `["bn", dim, affine]` (BatchNorm1d with running
statistics), `["relu"]`, `["gelu"]`. `build_head` turns it into an `nn.Sequential` whose
state-dict keys are `{index}.weight`, `{index}.running_mean`, ...
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

Layout = list[list[Any]]


def mlp_layout(in_dim: int, hidden_dim: int, out_dim: int) -> Layout:
    """MoCo-v2 / SEED projection MLP: Linear(in, hidden) - ReLU - Linear(hidden, out)."""
    return [["linear", in_dim, hidden_dim, True], ["relu"], ["linear", hidden_dim, out_dim, True]]


def build_head(layout: Sequence[Sequence[Any]]) -> nn.Sequential:
    """The `nn.Sequential` a layout describes (kept in its `.layout`); errors name the entry."""
    layers: list[nn.Module] = []
    for i, entry in enumerate(layout):
        kind = entry[0] if entry else None
        args = list(entry[1:])
        if kind == "linear" and len(args) == 3:
            layers.append(nn.Linear(int(args[0]), int(args[1]), bias=bool(args[2])))
        elif kind == "bn" and len(args) == 2:
            layers.append(nn.BatchNorm1d(int(args[0]), affine=bool(args[1])))
        elif kind == "relu" and not args:
            layers.append(nn.ReLU(inplace=True))
        elif kind == "gelu" and not args:
            layers.append(nn.GELU())
        else:
            raise ValueError(f"head layout entry {i} {list(entry)!r} is not one of "
                             "['linear', in, out, bias], ['bn', dim, affine], ['relu'], ['gelu']")
    head = nn.Sequential(*layers)
    head.layout = [list(entry) for entry in layout]  # so the head can be saved with its layout
    return head


def layout_out_dim(layout: Sequence[Sequence[Any]], in_dim: int) -> int:
    """Output width of a head layout fed `in_dim` features."""
    dim = in_dim
    for entry in layout:
        if entry[0] == "linear":
            if int(entry[1]) != dim:
                raise ValueError(f"head layout {list(entry)!r} expects {entry[1]} inputs, "
                                 f"gets {dim}")
            dim = int(entry[2])
        elif entry[0] == "bn" and int(entry[1]) != dim:
            raise ValueError(f"head layout {list(entry)!r} expects {entry[1]} inputs, gets {dim}")
    return dim

