"""The settings search / ablation table: rows collected from `dvc exp show --json`, rendered
into the README between its markers, checked for staleness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seed_core.report.experiments import (BEGIN, END, collect, holdout_table, main, merge_rows,
                                          seed_comparisons, section, table)


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


def test_a_run_with_headline_json_reads_the_same_row_from_it() -> None:
    """Runs since headline.json declare only it and summary.json as metrics; their row equals
    the row read from the detailed files of older runs."""
    old = collect(SHOWN)[1]
    headline = {"holdout": {"teacher": {"knn_top1": None, "linear_top1": None},
                            "baseline": {"knn_top1": None, "linear_top1": None},
                            "student": {"knn_top1": 73.0, "linear_top1": None}},
                "seed_vs_baseline": {p: {"difference": v["student_vs_baseline"]["difference"],
                                         "p_value": v["student_vs_baseline"]["p_value"]}
                                     for p, v in PAIRED.items()},
                "train_seconds": {"student": 87.4}}
    experiment = run({**BASE, "distill": {"t_teacher": 0.01, "hidden_dim": 0}}, summary(74.0),
                     {}, "tt001", "b" * 40)
    experiment["data"]["metrics"] = {
        "metrics/summary.json": experiment["data"]["metrics"]["metrics/summary.json"],
        "metrics/headline.json": {"data": headline}}
    shown = [{**SHOWN[1], "experiments": [{"name": "tt001", "revs": [experiment]}]}]
    new = collect(shown)[1]
    assert new == old
    assert new["holdout_top1"]["student"]["knn"] == 73.0
    assert new["seconds"] == {"pretrain_teacher": None, "pretrain_baseline": None,
                              "distill": 87.4}


def test_a_run_with_headline_rows_reads_the_same_row_from_them() -> None:
    """Runs since metrics/headline/ declare only its four files as metrics (p as text); their
    row equals the row read from the files of older runs. A stage's own `metrics/teacher.json`
    (a metric of runs before b4938e5) is not taken for `metrics/headline/teacher.json`."""
    old = collect(SHOWN)[1]
    rows = {"teacher": {"knn": 80.0, "linear": 83.0},
            "baseline": {"knn": 60.0, "linear": 61.0},
            "student": {"knn": 74.0, "knn_holdout": 73.0, "linear": 76.0, "train_s": 87.4},
            "seed_minus_baseline": {"knn": 13.4, "knn_p": "1.0e-40", "linear": 15.7,
                                    "linear_p": "0.002"}}
    experiment = run({**BASE, "distill": {"t_teacher": 0.01, "hidden_dim": 0}}, summary(74.0),
                     {}, "tt001", "b" * 40)
    experiment["data"]["metrics"] = {
        "metrics/teacher.json": {"data": {"knn": 1.0, "seconds": 5.0}},
        **{f"metrics/headline/{name}.json": {"data": row} for name, row in rows.items()}}
    shown = [{**SHOWN[1], "experiments": [{"name": "tt001", "revs": [experiment]}]}]
    new = collect(shown)[1]
    assert new == old
    rows["seed_minus_baseline"]["knn_p"] = "< 1e-300"
    assert collect(shown)[1]["seed_vs_baseline"]["knn"] == {"difference": 13.4, "p_value": 0.0}
    assert "+13.40 (p < 1e-300)" in table(collect(shown))


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


def _seed_row(name: str, changed: dict, seed: int, knn: float, linear: float,
              teacher_knn: float = 80.0) -> dict:
    return {"name": name, "changed": changed, "seed": seed, "base_commit": "new",
            "top1": {m: {"knn": 99.99, "linear": 99.99} for m in ("teacher", "baseline",
                                                                  "student")},
            "holdout_top1": {"teacher": {"knn": teacher_knn, "linear": 82.0},
                             "baseline": {"knn": 60.0, "linear": 61.5},
                             "student": {"knn": knn, "linear": linear}},
            "seed_vs_baseline": {p: {"difference": None, "p_value": None}
                                 for p in ("knn", "linear")},
            "seconds": {"distill": 50.0}}


def test_seed_runs_are_paired_by_seed_against_the_defaults() -> None:
    lr = {"distill.lr_schedule": "seed"}
    rows = [_seed_row("main", {}, 0, 70.0, 72.0),
            _seed_row("seed-1", {"distill.seed": 1}, 1, 68.0, 70.0),
            _seed_row("seed-2", {"distill.seed": 2}, 2, 71.0, 73.0),
            _seed_row("lr", lr, 0, 72.0, 73.0),                        # +1.5 on seed 0
            _seed_row("lr-1", {**lr, "distill.seed": 1}, 1, 71.0, 71.0),  # +2.0 on seed 1
            _seed_row("lr-2", {**lr, "distill.seed": 2}, 2, 73.0, 74.0),  # +1.5 on seed 2
            # another teacher: not paired with the defaults above
            _seed_row("other-t", {"distill.t_teacher": 0.01}, 0, 90.0, 90.0, teacher_knn=50.0),
            _seed_row("other-t-1", {"distill.t_teacher": 0.01, "distill.seed": 1}, 1, 90.0,
                      90.0, teacher_knn=50.0),
            # a single seed: nothing to pair over
            _seed_row("queue", {"distill.queue_size": 8}, 0, 60.0, 60.0)]
    (only,) = seed_comparisons(rows)
    assert only["changed"] == lr and only["seeds"] == [0, 1, 2]
    assert only["defaults"] == [71.0, 69.0, 72.0] and only["variant"] == [72.5, 71.0, 73.5]
    assert only["differences"] == pytest.approx([1.5, 2.0, 1.5])
    # naive paired t-interval: mean 5/3, sd sqrt(1/12), t(0.975, 2 df) = 4.303
    half = 4.303 * (1 / 12) ** 0.5 / 3 ** 0.5
    assert only["interval"] == pytest.approx((5 / 3 - half, 5 / 3 + half))
    text = section(rows)
    assert ("| `distill.lr_schedule=seed` | 0, 1, 2 | 70.67 ± 1.53 | 72.33 ± 1.26 | "
            "+1.50 / +2.00 / +1.50 | +1.67 [+0.95, +2.38] |") in text
    assert "t-interval" in text


def test_a_change_within_the_seed_noise_gets_an_interval_that_holds_zero() -> None:
    rows = [_seed_row("main", {}, 0, 70.0, 72.0), _seed_row("s1", {"distill.seed": 1}, 1, 68.0,
                                                              70.0),
            _seed_row("v0", {"x.y": 1}, 0, 72.0, 73.0),
            _seed_row("v1", {"x.y": 1, "distill.seed": 1}, 1, 67.0, 68.0)]
    (only,) = seed_comparisons(rows)
    low, high = only["interval"]
    assert only["differences"] == pytest.approx([1.5, -1.5]) and low < 0 < high


def test_collecting_a_later_commit_replaces_the_same_run_read_again() -> None:
    kept = [{**_seed_row("a83de80", {}, 0, 70.0, 72.0), "base_commit": "a83de80"},
            {**_seed_row("lr", {"x": 1}, 0, 71.0, 72.0), "base_commit": "a83de80"}]
    collected = [{**_seed_row("68ed048", {}, 0, 70.0, 72.0), "base_commit": "68ed048"},
                 {**_seed_row("s1", {"distill.seed": 1}, 1, 69.0, 72.0),
                  "base_commit": "68ed048"}]
    merged = merge_rows(kept, collected)
    assert [r["name"] for r in merged] == ["lr", "68ed048", "s1"]


def test_runs_of_several_commits_that_share_a_name_are_told_apart() -> None:
    def row(commit: str, knn: float) -> dict:
        return {"name": "main", "base_commit": commit, "changed": {}, "seed": 0,
                "holdout_top1": {"teacher": {"knn": 80.0, "linear": 83.0},
                                 "baseline": {"knn": 50.0, "linear": 53.0},
                                 "student": {"knn": knn, "linear": 76.0}},
                "seconds": {"distill": 77.0}}
    both = holdout_table([row("142effd", 75.7), row("8eba1b7", 74.5)])
    assert "| 1 | main @ 142effd |" in both and "| 2 | main @ 8eba1b7 |" in both
    assert "| 1 | main |" in holdout_table([row("142effd", 75.7)])
