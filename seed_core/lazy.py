"""Lazy package exports (PEP 562): `from seed_core.data import open_shards` loads only the
module that defines `open_shards`, so a stage's import closure, and thereby its DVC code
dependencies, holds what it uses and nothing else (see `seed_core.codemap`)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, table: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for a package whose names live in submodules.

    Args:
        package: the package's `__name__`.
        table: `{exported name: absolute module name that defines it}`; the codemap reads this
            literal, so keep it a plain dict of strings named `LAZY_EXPORTS`.
    """
    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(table[name]), name)

    def __dir__() -> list[str]:
        return sorted(table)

    return __getattr__, __dir__
