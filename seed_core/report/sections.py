"""Generated sections of the README and docs pages: rewrite one in place, or check it is current.

The tables and summaries rendered from `metrics/` (experiments, small views, shuffling BN) live
between marker lines of a page; `refresh_section` is what each tool's `--check` and default
mode share.
"""

from __future__ import annotations

import sys
from pathlib import Path

from seed_core.io import splice_section


def refresh_section(page: str | Path, begin: str, end: str, section: str, *, check: bool,
                    what: str, command: str) -> int:
    """Put `section` between the lines `begin` and `end` of `page` (0), or with `check` leave the
    page alone and return 1, saying that `what` is stale and which `command` refreshes it, when
    the page's section differs."""
    page = Path(page)
    text = page.read_text()
    new = splice_section(text, begin, end, section, str(page))
    if new == text:
        return 0
    if check:
        print(f"{page}: {what} is stale; run {command}", file=sys.stderr)
        return 1
    page.write_text(new)
    return 0
