"""MoCo-v2's shuffling BN over seeds (issue 17): the `make reproduce` baselines with and without it.

    cd reproduce && dvc repro                                  # the baselines with shuffling BN
    (copy reproduce/runs to RUNS_WITHOUT after a `dvc repro` with pretrain.shuffle_bn_group=0)
    python -m seed_core.report.shuffle_bn --with reproduce/runs --without RUNS_WITHOUT \\
        --out metrics/shuffle_bn.json --doc docs/methodology.md

Every student of `reproduce.students` is pre-trained as a MoCo-v2 baseline once per seed of
`reproduce.seeds`, with the default `pretrain.shuffle_bn_group` (keys normalised in shuffled
groups, MoCo §3.3) and with 0 (the key batch normalised at once, as before commit 805c760); the
two runs of one (student, seed) differ in that key only: the same initialisation, data order and
augmentations. Each pair is compared on the same test images (McNemar, paired bootstrap), and the
pairs' differences are summarised per protocol by their mean with a 95% t-interval over the
(student, seed) pairs and by the count of pairs significantly better, worse or neither. The SEED
students do not depend on the key (they distil from the pipeline's teacher), so the table also
gives SEED's mean gain over each kind of baseline: what the leak did to the headline gain.

The section of `--doc` between the shuffle-BN markers is rendered from `--out`'s JSON (`--check`:
exit 1 if stale). Not a DVC stage: the variant's runs are not kept in the cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from seed_core.config import load_params
from seed_core.evaluation.stats import mean_interval
from seed_core.io import read_json, write_json
from seed_core.report.comparisons import compare_files
from seed_core.report.sections import refresh_section
from seed_core.report.tables import p_label, signed

BEGIN, END = "<!-- shuffle-bn: begin -->", "<!-- shuffle-bn: end -->"
PROTOCOLS = ("knn", "linear")
PROTOCOL_NAMES = {"knn": "kNN", "linear": "linear"}


def baseline_file(runs: Path, arch: str, seed: int, name: str) -> Path:
    """`RUNS/<arch>/<seed>/baseline/<name>` (the layout of `reproduce/dvc.yaml`)."""
    path = runs / arch / str(seed) / "baseline" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `cd reproduce && dvc repro` for this "
                                f"variant first (it writes every student's baseline per seed)")
    return path


def compare_runs(with_runs: Path, without_runs: Path, students: Sequence[str],
                 seeds: Sequence[int]) -> dict[str, Any]:
    """Per student, protocol and seed: test top-1 with and without shuffling BN, the paired test
    of with − without, and the holdout top-1 of both (what settings are chosen on)."""
    pairs: dict[str, Any] = {}
    for arch in students:
        pairs[arch] = {}
        for protocol in PROTOCOLS:
            rows = []
            for seed in seeds:
                files = [baseline_file(runs, arch, seed, f"{protocol}.safetensors")
                         for runs in (with_runs, without_runs)]
                holdout = [read_json(baseline_file(runs, arch, seed, f"{protocol}.json"))
                           ["holdout"]["top1"] for runs in (with_runs, without_runs)]
                test = compare_files(*files)
                rows.append({"seed": seed, "with": round(test["a_top1"], 2),
                             "without": round(test["b_top1"], 2),
                             "difference": round(test["difference"], 2),
                             "ci": [round(test["ci_low"], 2), round(test["ci_high"], 2)],
                             "p_value": float(f"{test['p_value']:.3g}"),
                             "significant": bool(test["significant"]),
                             "samples": int(test["samples"]),
                             "holdout_with": holdout[0], "holdout_without": holdout[1]})
            pairs[arch][protocol] = rows
    return pairs


def summarise(pairs: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
              seed_top1: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, Any]:
    """Per protocol over every (student, seed) pair: the mean with − without difference and its
    95% t-interval, the counts of significantly better / worse / neither, and SEED's mean gain
    over the baseline with and without shuffling BN (`seed_top1[arch][protocol]`: per seed)."""
    out: dict[str, Any] = {}
    for protocol in PROTOCOLS:
        rows = [row for arch in pairs for row in pairs[arch][protocol]]
        mean, low, high = mean_interval([row["difference"] for row in rows])
        gains = {kind: [seed - row[kind] for arch in pairs
                        for row, seed in zip(pairs[arch][protocol], seed_top1[arch][protocol])]
                 for kind in ("with", "without")}
        out[protocol] = {
            "pairs": len(rows), "mean_difference": round(mean, 2),
            "interval": [round(low, 2), round(high, 2)] if low is not None else None,
            "better": sum(row["significant"] and row["difference"] > 0 for row in rows),
            "worse": sum(row["significant"] and row["difference"] < 0 for row in rows),
            "not_significant": sum(not row["significant"] for row in rows),
            "seed_gain_over_with": round(sum(gains["with"]) / len(rows), 2),
            "seed_gain_over_without": round(sum(gains["without"]) / len(rows), 2)}
    return out


def _seed_top1(reproduce: Mapping[str, Any], students: Sequence[str]) -> dict[str, Any]:
    return {arch: {p: reproduce["students"][arch]["seed"][f"{p}_top1"] for p in PROTOCOLS}
            for arch in students}


def section(result: Mapping[str, Any]) -> str:
    """The markdown between the shuffle-BN markers."""
    group = result["shuffle_bn_group"]
    lines = [f"Test top-1 of each `make reproduce` baseline with shuffling BN "
             f"(`pretrain.shuffle_bn_group: {group}`) and without (`0`), the same seed and "
             f"everything else equal; per seed, with − without and McNemar's p on the same "
             f"{result['test_images']:,} test images (commit {result['commit']}).", "",
             "| student | protocol | mean with | mean without | with − without per seed "
             "(p) |", "|---|---|--:|--:|---|"]
    for arch, protocols in result["pairs"].items():
        for protocol, rows in protocols.items():
            cells = ", ".join(f"{signed(row['difference'])} ({p_label(row['p_value'])})"
                              for row in rows)
            mean_with = sum(row["with"] for row in rows) / len(rows)
            mean_without = sum(row["without"] for row in rows) / len(rows)
            lines.append(f"| {arch} | {PROTOCOL_NAMES[protocol]} | {mean_with:.2f} | "
                         f"{mean_without:.2f} | {cells} |")
    lines.append("")
    for protocol, s in result["summary"].items():
        interval = (f"95% t-interval {signed(s['interval'][0])} to {signed(s['interval'][1])}"
                    if s["interval"] else "one pair: no interval")
        lines.append(
            f"- **{PROTOCOL_NAMES[protocol]}**: over {s['pairs']} student-seed pairs, shuffling "
            f"BN changes the baseline by {signed(s['mean_difference'])} points on average "
            f"({interval}); of the pairs, {s['better']} significantly better, {s['worse']} "
            f"significantly worse, {s['not_significant']} not significant (p < 0.05). SEED's "
            f"mean gain over the "
            f"baseline is {signed(s['seed_gain_over_with'])} with shuffling BN and "
            f"{signed(s['seed_gain_over_without'])} without.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seed_core.report.shuffle_bn",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--with", dest="with_runs", help="reproduce runs with shuffling BN")
    parser.add_argument("--without", dest="without_runs",
                        help="the same runs made with pretrain.shuffle_bn_group=0")
    parser.add_argument("--reproduce", default="metrics/reproduce.json",
                        help="metrics/reproduce.json of the run with shuffling BN (SEED's top-1)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--commit", default="", help="the commit the runs were made at")
    parser.add_argument("--out", default="metrics/shuffle_bn.json")
    parser.add_argument("--doc", help="rewrite this page's shuffle-BN section")
    parser.add_argument("--check", action="store_true", help="exit 1 if --doc is stale")
    args = parser.parse_args(argv)
    if args.with_runs and args.without_runs:
        params = load_params(args.params)
        students, seeds = params.reproduce.students, params.reproduce.seeds
        pairs = compare_runs(Path(args.with_runs), Path(args.without_runs), students, seeds)
        result = {"commit": args.commit, "shuffle_bn_group": params.pretrain.shuffle_bn_group,
                  "test_images": pairs[students[0]]["knn"][0]["samples"], "pairs": pairs,
                  "summary": summarise(pairs, _seed_top1(read_json(args.reproduce), students))}
        write_json(args.out, result)
    if args.doc:
        return refresh_section(args.doc, BEGIN, END, section(read_json(args.out)),
                               check=args.check, what="the shuffle-BN section",
                               command=f"python -m seed_core.report.shuffle_bn --doc {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
