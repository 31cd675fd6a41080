"""This repository's runs side by side: `python -m seed_core.report.compare [--split holdout]`.

One row per committed run and per DVC experiment made on it (`dvc exp show --json`): the params
that differ from the committed run, kNN and linear top-1 of teacher, baseline and SEED, SEED −
baseline with McNemar's p, and the command that reproduces the row. `--split test` (the default)
shows the final test-split numbers; `--split holdout` the accuracies the settings were chosen on,
which is what to rank runs by before looking at test numbers. The paired tests exist on the test
split only and say so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from seed_core.report.experiments import SPLITS, collect, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seed_core.report.compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="test",
                        help="accuracies on the test split (default) or the holdout split")
    args = parser.parse_args(argv)
    try:
        done = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    except FileNotFoundError:
        print("dvc is not on PATH: activate the project's venv (source .venv/bin/activate)",
              file=sys.stderr)
        return 2
    if done.returncode != 0:
        print(f"dvc exp show --json failed: {done.stderr.strip()[-2000:]}", file=sys.stderr)
        return 1
    rows = collect(json.loads(done.stdout))
    if not rows:
        print("no committed run to compare: commit a finished `dvc repro`, then `dvc exp run -S "
              "section.key=value` for each variant", file=sys.stderr)
        return 1
    print(f"Top-1 (%) on the {args.split} split; SEED − baseline is the paired McNemar test on "
          f"the test split.\n")
    print(table(rows, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
