"""The settings search / ablation table: rows collected from `dvc exp show --json`, rendered
into the README between its markers, checked for staleness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seed_core.report.experiments import BEGIN, END, collect, main, merge_rows, section, table


def run(x: dict, summary: dict, paired: dict, name: str, rev: str) -> dict:
    return {"rev": rev, "name": name, "error": None, "data": {
        "rev": rev, "params": {"params.yaml": {"data": x}},
        "metrics": {"metrics/summary.json": {"data": summary},
                    "metrics/paired.json": {"data": paired},
                    "metrics/distill.json": {"data": {"seconds": 87.4}},
                    "metrics/knn_student.json": {"data": {"holdout": {"top1": summary[
                        "student"]["knn_top1"] - 1}}}}}}


def summary(seed: float) -> dict:
    return {"teacher": {"knn_top1": 80.0, "linear_top1": 83.0},
            "baseline": {"knn_top1": 60.0, "linear_top1": 61.0},
            "student": {"knn_top1": seed, "linear_top1": seed + 2}}


PAIRED = {"knn": {"student_vs_baseline": {"difference": 13.4, "p_value": 1e-40}},
          "linear": {"student_vs_baseline": {"difference": 15.7, "p_value": 2e-3}}}
BASE = {"distill": {"t_teacher": 0.0001, "hidden_dim": 0}, "student": {"arch": "m"}}
SHOWN = [
    {"rev": "workspace", "name": None, "data": {"params": {}}, "error": None,
     "experiments": None},
    {**run(BASE, summary(73.4), PAIRED, "main", "a" * 40), "experiments": [
        {"name": "tt001", "revs": [run({**BASE, "distill": {"t_teacher": 0.01, "hidden_dim": 0}},
                                       summary(74.0), PAIRED, "tt001", "b" * 40)]},
        {"name": "broken", "revs": [{"rev": "c" * 40, "name": "broken", "data": None,
                                     "error": {"msg": "failed"}}]}]},
]


def test_rows_keep_what_changed_and_the_headline_numbers() -> None:
    rows = collect(SHOWN)
    assert [r["name"] for r in rows] == ["main", "tt001"]  # workspace and failed runs left out
    assert rows[0]["changed"] == {} and rows[1]["changed"] == {"distill.t_teacher": 0.01}
    assert rows[1]["top1"]["student"] == {"knn": 74.0, "linear": 76.0}
    assert rows[1]["seed_vs_baseline"]["knn"] == {"difference": 13.4, "p_value": 1e-40}
    assert rows[1]["seconds"]["distill"] == 87.4
    text = table(rows)
    assert "| tt001 | `distill.t_teacher=0.01` | 80.00 / 83.00 | 60.00 / 61.00 | 74.00 / 76.00 |" \
        in text
    assert "+13.40 (p=1.0e-40) | +15.70 (p=0.002) | 87 | `dvc exp run -S distill.t_teacher=0.01`" \
        in text


def test_the_holdout_split_is_labelled_and_keeps_the_test_tests_apart() -> None:
    rows = collect(SHOWN)
    assert rows[1]["holdout_top1"]["student"] == {"knn": 73.0, "linear": None}
    text = table(rows, "holdout")
    assert "SEED − baseline, kNN (test) |" in text
    # holdout numbers where the runs have them, a dash where not
    assert "| tt001 | `distill.t_teacher=0.01` | – / – | – / – | 73.00 / – |" in text


def test_readme_section_is_rewritten_and_checked(tmp_path: Path) -> None:
    rows = tmp_path / "experiments.json"
    rows.write_text(json.dumps(collect(SHOWN)))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    assert main([str(readme), "--rows", str(rows), "--check"]) == 1
    assert main([str(readme), "--rows", str(rows)]) == 0
    assert "| tt001 |" in readme.read_text() and readme.read_text().endswith("\n\nafter\n")
    assert main([str(readme), "--rows", str(rows), "--check"]) == 0
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="needs exactly one line"):
        main([str(readme), "--rows", str(rows)])


def test_collecting_keeps_the_rows_of_earlier_clones_and_replaces_rerun_ones() -> None:
    kept = [{"name": "old-a", "base_commit": "aaa", "v": 1},
            {"name": "same", "base_commit": "bbb", "v": 1},
            {"name": "same", "base_commit": "aaa", "v": 1}]
    collected = [{"name": "same", "base_commit": "bbb", "v": 2},
                 {"name": "new", "base_commit": "bbb", "v": 2}]
    merged = merge_rows(kept, collected)
    assert [(r["name"], r["base_commit"], r["v"]) for r in merged] == [
        ("old-a", "aaa", 1), ("same", "aaa", 1), ("same", "bbb", 2), ("new", "bbb", 2)]


def test_runs_with_holdout_values_are_ranked_on_them_without_test_numbers() -> None:
    def row(name: str, seed_knn: float | None, seed_linear: float | None) -> dict:
        return {"name": name, "changed": {"distill.t_teacher": 0.01} if name != "main" else {},
                "top1": {m: {"knn": 99.99, "linear": 99.99} for m in ("teacher", "baseline",
                                                                      "student")},
                "holdout_top1": {"teacher": {"knn": 80.0, "linear": 82.0},
                                 "baseline": {"knn": 60.0, "linear": 61.5},
                                 "student": {"knn": seed_knn, "linear": seed_linear}},
                "seed_vs_baseline": {p: {"difference": 1.0, "p_value": 0.5}
                                     for p in ("knn", "linear")},
                "seconds": {"distill": 50.0}, "base_commit": "new"}

    old = {**row("old", None, None), "holdout_top1": None, "base_commit": "9d5bd31"}
    text = section([old, row("main", 70.0, 72.0), row("better", 74.0, 71.0),
                    row("half", 80.0, None)])
    cut = text.index("\n| run | changed |")  # the older runs' table follows the ranked one
    ranked, rest = text[:cut], text[cut:]
    lines = [line for line in ranked.splitlines() if line.startswith("| ") and "rank" not in line]
    # by the mean of SEED's two holdout accuracies (72.5 > 71.0); a run missing one is not ranked
    assert [line.split(" | ")[1] for line in lines] == ["better", "main"]
    assert lines[0].startswith("| 1 | better | `distill.t_teacher=0.01` | 72.50 | 80.00 / 82.00 "
                               "| 60.00 / 61.50 | 74.00 / 71.00 | +14.00 / +9.50 | 50 |")
    assert "99.99" not in ranked and "p=" not in ranked  # no test-split number in the ranking
    assert "made from commit `new`" in ranked
    assert "| old |" in rest and "| half |" in rest and "commits `9d5bd31`, `new`" in rest
