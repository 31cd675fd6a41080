"""The settings search and ablation table, from the actual DVC experiments.

    python -m seed_core.report.experiments --collect metrics/experiments.json  # dvc exp show
    python -m seed_core.report.experiments README.md [--check]                  # the table

`--collect` reads `dvc exp show --json` (the committed baseline run and every experiment made on
it with `dvc exp run -S ...`) and adds to the file, per run, the params that differ from the
baseline and the rows of `metrics/headline/` (test and holdout top-1 per model, training
seconds, SEED − baseline with its paired test; older runs: the files that held them then).
Experiments live in local git refs that a clone does not fetch, so the rows are committed as
`metrics/experiments.json` and kept across collections, and the README's section between the
markers is rendered from that file (`--check`: exit 1 if stale).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from seed_core.evaluation.stats import mean_interval, seed_spread
from seed_core.io import read_json, write_json
from seed_core.report.sections import refresh_section
from seed_core.report.tables import (GAIN_ROW, HEADLINE_DIR, TRAINING_FILES, p_label,
                                      p_of_label)

BEGIN, END = "<!-- experiments: begin -->", "<!-- experiments: end -->"
MODELS = ("teacher", "baseline", "student")
PROTOCOLS = ("knn", "linear")
SEED_KEY = "distill.seed"  # the student's seed: what the seeds table varies, teacher held fixed


def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _file_data(section: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The data of the file whose path ends in `name` (`summary.json`, `headline/teacher.json`)."""
    tail = Path(name).parts
    for path, entry in (section or {}).items():
        if Path(path).parts[-len(tail):] == tail and isinstance(entry, Mapping):
            return dict(entry.get("data") or {})
    return {}


def run_row(name: str, data: Mapping[str, Any], base_params: Mapping[str, Any]) -> dict[str, Any]:
    """One run of `dvc exp show --json`: changed params, accuracies, tests, training seconds."""
    params = flat(_file_data(data.get("params", {}), "params.yaml"))
    metrics = data.get("metrics", {})
    rows = {name: _file_data(metrics, f"{HEADLINE_DIR}/{name}.json")
            for name in (*MODELS, GAIN_ROW)}
    if any(rows.values()):
        summary, headline = _summary_and_headline_of_rows(rows)
    else:  # runs made before metrics/headline/ (up to commit b32e6f5)
        summary = _file_data(metrics, "summary.json")
        headline = _file_data(metrics, "headline.json") or _headline_of_older_run(metrics)
    holdout, tests = headline.get("holdout") or {}, headline.get("seed_vs_baseline") or {}
    trained = headline.get("train_seconds") or {}
    return {
        "name": name, "changed": {k: v for k, v in params.items() if base_params.get(k) != v},
        "seed": params.get(SEED_KEY),
        "top1": {model: {p: summary.get(model, {}).get(f"{p}_top1") for p in PROTOCOLS}
                 for model in MODELS},
        # what the kNN (k, T) and the linear lr were chosen on: ranking runs by it keeps the
        # test split for the final numbers only
        "holdout_top1": {model: {p: (holdout.get(model) or {}).get(f"{p}_top1")
                                 for p in PROTOCOLS} for model in MODELS},
        "seed_vs_baseline": {p: {key: (tests.get(p) or {}).get(key)
                                 for key in ("difference", "p_value")} for p in PROTOCOLS},
        "seconds": {Path(TRAINING_FILES[model]).stem: trained.get(model) for model in MODELS},
    }


def _summary_and_headline_of_rows(rows: Mapping[str, Mapping[str, Any]]
                                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """summary.json's and headline.json's layouts (the earlier metrics files) from the rows of
    `metrics/headline/`, see `seed_core.report.tables.headline_rows`."""
    summary = {model: {f"{p}_top1": rows[model].get(p) for p in PROTOCOLS} for model in MODELS}
    gain = rows[GAIN_ROW]
    headline = {
        "holdout": {model: {f"{p}_top1": rows[model].get(f"{p}_holdout") for p in PROTOCOLS}
                    for model in MODELS},
        "seed_vs_baseline": {p: {"difference": gain.get(p),
                                 "p_value": None if gain.get(f"{p}_p") is None
                                 else p_of_label(gain[f"{p}_p"])} for p in PROTOCOLS},
        "train_seconds": {model: rows[model].get("train_s") for model in MODELS}}
    return summary, headline


def _headline_of_older_run(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """headline.json's layout from the detailed metrics files that runs made before it (up to
    commit b4938e5) declared as DVC metrics; missing values stay missing."""
    paired = _file_data(metrics, "paired.json")
    return {
        "holdout": {model: {f"{p}_top1": (_file_data(metrics, f"{p}_{model}.json")
                                          .get("holdout") or {}).get("top1")
                            for p in PROTOCOLS} for model in MODELS},
        "seed_vs_baseline": {p: paired.get(p, {}).get("student_vs_baseline", {})
                             for p in PROTOCOLS},
        "train_seconds": {model: _file_data(metrics, name).get("seconds")
                          for model, name in TRAINING_FILES.items()},
    }


def collect(shown: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the baseline commit (the workspace excluded) and of its experiments."""
    rows: list[dict[str, Any]] = []
    for baseline in shown:
        if baseline.get("rev") == "workspace" or not baseline.get("data"):
            continue
        base_params = flat(_file_data(baseline["data"].get("params", {}), "params.yaml"))
        commit = str(baseline.get("rev", ""))[:7]
        rows.append({**run_row(baseline.get("name") or commit, baseline["data"], base_params),
                     "base_commit": commit})
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("data") and not rev.get("error"):
                    rows.append({**run_row(rev.get("name") or experiment.get("name"),
                                           rev["data"], base_params), "base_commit": commit})
    return rows


def merge_rows(kept: list[dict[str, Any]], collected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The committed rows, then the collected ones: a collected row replaces a kept row of the
    same name and base commit, or one with the same params and accuracies (the same run, read
    again from a later commit whose outputs did not change). Experiments live in local git refs
    that a clone lacks, so rows of earlier sessions are kept rather than lost."""
    fresh = {(row["name"], row.get("base_commit")) for row in collected}
    same_run = {_run_identity(row) for row in collected} - {None}
    return [row for row in kept if (row["name"], row.get("base_commit")) not in fresh
            and _run_identity(row) not in same_run] + collected


def _run_identity(row: Mapping[str, Any]) -> str | None:
    """Params and accuracies, or None for a row that recorded no accuracies."""
    if not row.get("top1") and not row.get("holdout_top1"):
        return None
    return json.dumps([row.get("changed"), row.get("top1"), row.get("holdout_top1")],
                      sort_keys=True)


def _pct(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "–"


def _gain(row: Mapping[str, Any], protocol: str) -> str:
    test = row["seed_vs_baseline"][protocol]
    if not isinstance(test.get("difference"), (int, float)):
        return "–"
    p = test.get("p_value")
    label = p_label(p) if isinstance(p, (int, float)) else "–"
    p_text = f"p {label}" if label.startswith("<") else f"p={label}"
    return f"{test['difference']:+.2f} ({p_text})"


def command(row: Mapping[str, Any]) -> str:
    if not row["changed"]:
        return "`dvc repro` (the defaults)"
    sets = " ".join(f"-S {k}={json.dumps(v) if isinstance(v, list) else v}"
                    for k, v in sorted(row["changed"].items()))
    return f"`dvc exp run {sets}`"


SPLITS = {"test": "top1", "holdout": "holdout_top1"}


def table(rows: list[Mapping[str, Any]], split: str = "test") -> str:
    """The runs side by side; accuracies on `split` (test or holdout), the paired tests of SEED
    against the baseline always on the test split (the only one they are computed on)."""
    gain = "" if split == "test" else " (test)"
    lines = [f"| run | changed | teacher kNN / lin | baseline kNN / lin | SEED kNN / lin | "
             f"SEED − baseline, kNN{gain} | SEED − baseline, linear{gain} | distill s | command |",
             "|---|---|--:|--:|--:|--:|--:|--:|---|"]
    for row in rows:
        changed = ", ".join(f"`{k}={v}`" for k, v in sorted(row["changed"].items())) or "–"
        top1 = row.get(SPLITS[split]) or {}
        accuracies = " | ".join(
            f"{_pct(top1.get(m, {}).get('knn'))} / {_pct(top1.get(m, {}).get('linear'))}"
            for m in MODELS)
        seconds = row["seconds"].get("distill")
        seconds_text = f"{seconds:.0f}" if isinstance(seconds, (int, float)) else "–"
        lines.append(f"| {row['name']} | {changed} | {accuracies} | {_gain(row, 'knn')} | "
                     f"{_gain(row, 'linear')} | {seconds_text} | {command(row)} |")
    return "\n".join(lines)


def holdout_score(row: Mapping[str, Any]) -> float | None:
    """What runs are ranked by: the mean of the SEED student's kNN and linear holdout top-1,
    or None when the run did not record both."""
    student = (row.get("holdout_top1") or {}).get("student") or {}
    values = [student.get(p) for p in PROTOCOLS]
    if not all(isinstance(v, (int, float)) for v in values):
        return None
    return sum(values) / len(values)


def holdout_table(rows: list[Mapping[str, Any]]) -> str:
    """The runs that recorded holdout accuracies, best first by `holdout_score`; no test-split
    number at all, so that reading it cannot move a setting on the test split."""
    ranked = sorted((r for r in rows if holdout_score(r) is not None),
                    key=lambda r: (-holdout_score(r), r["name"]))
    lines = ["| rank | run | changed | SEED mean of kNN and lin | teacher kNN / lin | "
             "baseline kNN / lin | SEED kNN / lin | SEED − baseline, kNN / lin | distill s | "
             "command |", "|--:|---|---|--:|--:|--:|--:|--:|--:|---|"]
    # runs of several commits can share a name ("main"): the commit tells them apart
    several = len({row.get("base_commit") for row in ranked}) > 1
    for rank, row in enumerate(ranked, 1):
        top1 = row["holdout_top1"]
        name = (f"{row['name']} @ {row['base_commit']}" if several and row.get("base_commit")
                else row["name"])
        changed = ", ".join(f"`{k}={v}`" for k, v in sorted(row["changed"].items())) or "–"
        accuracies = " | ".join(
            f"{_pct(top1.get(m, {}).get('knn'))} / {_pct(top1.get(m, {}).get('linear'))}"
            for m in MODELS)
        gains = []
        for protocol in PROTOCOLS:
            seed, base = (top1.get(m, {}).get(protocol) for m in ("student", "baseline"))
            both = isinstance(seed, (int, float)) and isinstance(base, (int, float))
            gains.append(f"{seed - base:+.2f}" if both else "–")
        seconds = row["seconds"].get("distill")
        seconds_text = f"{seconds:.0f}" if isinstance(seconds, (int, float)) else "–"
        lines.append(f"| {rank} | {name} | {changed} | {holdout_score(row):.2f} | "
                     f"{accuracies} | {' / '.join(gains)} | {seconds_text} | {command(row)} |")
    return "\n".join(lines)


def _seed_of(row: Mapping[str, Any]) -> Any:
    return row.get("seed", row["changed"].get(SEED_KEY))


def _variant(row: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """What a run changed apart from the student's seed (empty: the defaults)."""
    return tuple(sorted((k, json.dumps(v)) for k, v in row["changed"].items() if k != SEED_KEY))


def _upstream(row: Mapping[str, Any]) -> str:
    """The teacher's and the baseline's holdout accuracies: runs that differ in them did not
    distil from the same teacher, and are not paired."""
    top1 = row.get("holdout_top1") or {}
    return json.dumps([top1.get(m) for m in ("teacher", "baseline")], sort_keys=True)


def seed_comparisons(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each variant that was run at two or more student seeds that the defaults were run at
    too (same teacher and baseline), against the defaults: per-seed holdout scores, their
    differences paired by seed, and the 95% t-interval of the mean difference. A later row of
    the same variant and seed replaces an earlier one."""
    by_key: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for row in rows:
        if holdout_score(row) is not None and _seed_of(row) is not None:
            by_key[(_upstream(row), _variant(row), _seed_of(row))] = row
    out = []
    for upstream, variant in sorted({(u, v) for u, v, _ in by_key if v}):
        seeds = sorted(s for u, v, s in by_key if (u, v) == (upstream, variant)
                       and (upstream, (), s) in by_key)
        if len(seeds) < 2:
            continue
        ours = [holdout_score(by_key[(upstream, variant, s)]) for s in seeds]
        defaults = [holdout_score(by_key[(upstream, (), s)]) for s in seeds]
        differences = [a - b for a, b in zip(ours, defaults)]
        mean, low, high = mean_interval(differences)
        out.append({"changed": dict((k, json.loads(v)) for k, v in variant), "seeds": seeds,
                    "variant": ours, "defaults": defaults, "differences": differences,
                    "mean_difference": mean, "interval": (low, high)})
    return out


def _spread_text(values: list[float]) -> str:
    spread = seed_spread(values)
    return f"{spread.mean:.2f} ± {spread.std:.2f}"


def seeds_table(comparisons: list[Mapping[str, Any]]) -> str:
    lines = ["| changed | student seeds | defaults | with the change | change − defaults, per "
             "seed | mean change, 95% t-interval |", "|---|---|--:|--:|--:|--:|"]
    for c in comparisons:
        changed = ", ".join(f"`{k}={v}`" for k, v in sorted(c["changed"].items()))
        low, high = c["interval"]
        lines.append(
            f"| {changed} | {', '.join(str(s) for s in c['seeds'])} | "
            f"{_spread_text(c['defaults'])} | {_spread_text(c['variant'])} | "
            f"{' / '.join(f'{d:+.2f}' for d in c['differences'])} | "
            f"{c['mean_difference']:+.2f} [{low:+.2f}, {high:+.2f}] |")
    return "\n".join(lines)


def _made_from(rows: list[Mapping[str, Any]]) -> str:
    commits = sorted({row.get("base_commit") for row in rows if row.get("base_commit")})
    return (f"made from commit{'s' if len(commits) > 1 else ''} "
            + ", ".join(f"`{c}`" for c in commits) if commits else "of unknown commits")


def section(rows: list[Mapping[str, Any]]) -> str:
    """The holdout-ranked table of the runs that recorded holdout accuracies, then the older
    runs that recorded only test-split ones, labelled as such."""
    ranked = [r for r in rows if holdout_score(r) is not None]
    older = [r for r in rows if holdout_score(r) is None]
    parts = []
    if ranked:
        parts.append(
            f"{holdout_table(ranked)}\n\nHoldout top-1 (%): the split the kNN (k, T) and the "
            f"linear lr are chosen on (10% of train, class-balanced), never the test split; runs "
            f"ranked by the mean of the SEED student's kNN and linear holdout top-1. SEED − "
            f"baseline is the difference of the two holdout accuracies (no paired test: the "
            f"holdout predictions are not kept per run). The test split is scored for the "
            f"committed defaults only: the results above. `distill s`: the stage's own seconds. "
            f"The runs were {_made_from(ranked)}.\n")
    comparisons = seed_comparisons(ranked)
    if comparisons:
        parts.append(
            f"{seeds_table(comparisons)}\n\nThe same holdout score (SEED's mean of kNN and "
            f"linear top-1, %) over student seeds (`{SEED_KEY}`; the teacher and the baseline "
            f"fixed): mean ± sample std, the differences paired by seed, and the 95% "
            f"t-interval of their mean (a paired t-test: an interval that holds 0 is no "
            f"evidence of a difference at 5%).\n")
    if older:
        parts.append(
            f"{table(older)}\n\nOlder runs, {_made_from(older)}, which recorded test-split "
            f"top-1 only (%); the paired test of SEED against the baseline is McNemar's, on the "
            f"same 10,000 test images. `distill s`: the stage's own seconds.\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seed_core.report.experiments",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("readme", nargs="?", help="README to rewrite (or --check)")
    parser.add_argument("--rows", default="metrics/experiments.json")
    parser.add_argument("--collect", action="store_true",
                        help="write --rows from `dvc exp show --json` first")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.collect:
        shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], check=True,
                                          capture_output=True, text=True).stdout)
        kept = read_json(args.rows) if Path(args.rows).exists() else []
        write_json(args.rows, merge_rows(kept, collect(shown)))
    if args.readme:
        if not Path(args.rows).exists():
            print(f"{args.rows}: missing; run python -m seed_core.report.experiments --collect "
                  f"in the repository whose `dvc exp show` holds the runs", file=sys.stderr)
            return 2
        return refresh_section(args.readme, BEGIN, END, section(read_json(args.rows)),
                               check=args.check, what="the experiments table",
                               command=f"python -m seed_core.report.experiments {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
