"""Progress bars that stay quiet when stderr is not a terminal (CI, DVC logs)."""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm


def progress(iterable: Iterable, **kwargs: Any) -> tqdm:
    """tqdm that stays quiet when stderr is not a terminal (CI, DVC logs)."""
    return tqdm(iterable, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


