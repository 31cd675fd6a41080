"""Per-step training curves as CSV (a DVC plot), kept in memory so a checkpoint can carry them."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Mapping, Sequence

from seed_core.io import write_text


class StepLog:
    """Rows of `columns`; `write()` replaces the CSV atomically."""

    def __init__(self, path: str | Path, columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.rows: list[dict[str, float]] = []

    def add(self, values: Mapping[str, float]) -> None:
        self.rows.append({c: values.get(c, "") for c in self.columns})

    def state_dict(self) -> dict:
        return {"columns": self.columns, "rows": [[row[c] for c in self.columns]
                                                  for row in self.rows]}

    def load_state_dict(self, state: Mapping) -> None:
        self.rows = [dict(zip(state["columns"], row)) for row in state["rows"]]

    def write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, buf.getvalue())
