"""Hyper-parameters are chosen on the holdout split: the kNN (k, T) search against a naive
grid search, its tie rule, the grid it searches, and where a choice sits in its grid."""

from __future__ import annotations

import logging

import pytest
import torch

from seed_core.evaluation.linear import select_lr, train_linear
from seed_core.evaluation.selection import grid_key, knn_grid, select_knn
from seed_core.evaluation.splits import grid_edge, holdout_split
from test_evaluation import naive_knn, random_data, separable_data


def naive_grid(fit_x, fit_y, hold_x, hold_y, ks, temperatures, classes):
    """Holdout top-1 of every (k, T), one full kNN per grid point."""
    return {(k, t): 100.0 * float((naive_knn(fit_x, fit_y, hold_x, k, t, classes).argmax(1)
                                   == hold_y).double().mean())
            for k in ks for t in temperatures}


def overlapping_clusters(n=400, classes=4, seed=0):
    x, y = separable_data(n=n, classes=classes, seed=seed, spread=0.8)
    return x, y


def test_select_knn_equals_a_naive_grid_search():
    x, y = overlapping_clusters()
    fit, hold = holdout_split(y, 0.25, seed=0)
    ks, ts = [1, 3, 10, 30], [0.03, 0.07, 0.2, 1.0]
    chosen = select_knn(x[fit], y[fit], x[hold], y[hold], ks, ts, (10, 0.07), 4)
    want = naive_grid(x[fit], y[fit], x[hold], y[hold], ks, ts, 4)
    assert chosen.grid_top1 == pytest.approx(want, abs=1e-9)
    best = max(want.values())
    assert want[chosen.best] == pytest.approx(best)
    assert chosen.top1 == pytest.approx(want[(chosen.k, chosen.temperature)])
    # the configured pair stays unless the best one beats it significantly
    if chosen.best != (10, 0.07):
        assert chosen.is_configured == (chosen.p_value >= 0.05)
    # the grid is not flat here, so the choice is informative
    assert min(want.values()) < best


def test_ties_go_to_the_configured_pair_then_to_grid_order():
    # well-separated clusters: every (k, T) scores 100% on the holdout
    x, y = separable_data(n=200, classes=4, spread=20.0)
    fit, hold = holdout_split(y, 0.2, seed=0)
    chosen = select_knn(x[fit], y[fit], x[hold], y[hold], [5, 10, 20], [0.05, 0.07], (20, 0.07),
                        4)
    assert set(chosen.grid_top1.values()) == {100.0}
    assert (chosen.k, chosen.temperature) == (20, 0.07) and chosen.is_configured
    # a significantly better pair beats the configured one (400 holdout images)
    x, y = overlapping_clusters(n=1600, seed=3)
    fit, hold = holdout_split(y, 0.25, seed=0)
    grid = naive_grid(x[fit], y[fit], x[hold], y[hold], [1, 30], [0.07], 4)
    assert grid[(30, 0.07)] > grid[(1, 0.07)]
    chosen = select_knn(x[fit], y[fit], x[hold], y[hold], [1, 30], [0.07], (1, 0.07), 4)
    assert chosen.k == 30 and not chosen.is_configured and chosen.k_edge == "highest"
    assert chosen.best == (30, 0.07) and chosen.p_value < 0.05


def test_tie_without_the_configured_pair_takes_the_first_in_grid_order():
    # one query, two classes: a hand-made bank where k = 1 and k = 3 agree and k = 5 flips
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9],
                         [0.2, 0.8], [0.3, 0.7]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    query, truth = torch.tensor([[0.7, 0.3]]), torch.tensor([0])
    chosen = select_knn(bank, labels, query, truth, [1, 3, 7], [0.07, 10.0], (7, 10.0), 2)
    assert chosen.grid_top1[(7, 10.0)] == 0.0  # 4 of 7 neighbours are class 1, T flattens
    assert chosen.grid_top1[(1, 0.07)] == chosen.grid_top1[(3, 10.0)] == 100.0
    assert chosen.best == (1, 0.07)
    # one holdout image of difference is no evidence (exact McNemar p = 0.5): configured kept
    assert chosen.p_value == pytest.approx(0.5) and chosen.is_configured
    assert chosen.k_edge == "highest" and chosen.temperature_edge == "highest"


def test_a_win_by_three_holdout_images_in_a_thousand_keeps_the_configured_pair():
    """The noise the rule is for: a pair right on 3 more of 1,000 holdout images and wrong on
    none more has exact one-sided McNemar p = 1/8, and the configured pair stays; a win by 12
    images (p = 2.4e-4) moves the choice."""
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    for extra, moves in ((3, False), (12, True)):
        # `extra` queries by class 0's point, of class 0: k = 1 right, k = 3 (two class-1
        # neighbours, flat T) wrong; the rest at class 1's points, of class 1: both right
        query = torch.tensor([[0.0, 1.0]]).repeat(1000, 1)
        query[:extra] = torch.tensor([1.0, 0.05])
        truth = torch.ones(1000, dtype=torch.long)
        truth[:extra] = 0
        chosen = select_knn(bank, labels, query, truth, [1, 3], [10.0], (3, 10.0), 2)
        assert chosen.grid_top1[(1, 10.0)] - chosen.grid_top1[(3, 10.0)] == pytest.approx(
            extra / 10)
        assert chosen.best == (1, 10.0) and chosen.p_value == pytest.approx(0.5 ** extra)
        assert (not chosen.is_configured) == moves, chosen


def test_select_knn_refuses_a_configured_pair_outside_the_grid():
    train, labels, test = random_data()
    with pytest.raises(ValueError, match=r"configured \(k, T\) = \(20, 0.07\) is not in the grid"):
        select_knn(train, labels, test, labels[:40], [5, 10], [0.07], (20, 0.07), 5)


def test_knn_grid_includes_the_configured_pair_and_fits_the_bank(caplog):
    ks, ts = knn_grid(20, 0.05, [10, 50, 200], [0.1, 0.03], bank_size=100)
    assert ks == [10, 20, 50] and ts == [0.03, 0.05, 0.1]
    assert "[200] exceed the 100-sample bank" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert knn_grid(5, 0.07, [5], [0.07], bank_size=5) == ([5], [0.07])
    with pytest.raises(ValueError, match="knn.k = 200 exceeds the 90 training samples"):
        knn_grid(200, 0.07, [10], [0.07], bank_size=90)
    assert grid_key(20, 0.07) == "k20_T0.07" and grid_key(10, 0.1) == "k10_T0.1"


def test_grid_edge():
    assert grid_edge(0.1, [0.1, 1.0, 10.0, 30.0]) == "lowest"
    assert grid_edge(30.0, [10.0, 30.0, 0.1]) == "highest"
    assert grid_edge(1.0, [0.1, 1.0, 10.0]) is None
    assert grid_edge(5.0, [5.0]) is None  # a single value is no grid
    assert grid_edge(2.0, [1.0, 3.0]) is None  # not in the grid


def test_select_lr_flags_a_best_lr_at_the_edge_of_the_grid():
    x, y = separable_data(spread=0.7)
    fit, hold = holdout_split(y, 0.2, 0)

    def train(lr):
        return train_linear(x[fit], y[fit], 4, 5, lr, 64, 0.9, 0.0, 0, "cpu")

    high = select_lr([1e-4, 0.1], train, x[hold], y[hold])
    assert high.best_lr == 0.1 and high.edge == "highest"
    assert high.lr_top1[0.1] > high.lr_top1[1e-4]
    inner = select_lr([1e-5, 0.1, 1e38], train, x[hold], y[hold])
    # 1e38 diverges, yet the grid's end is where it is: 0.1 is interior
    assert inner.best_lr == 0.1 and inner.edge is None and inner.lr_top1[1e38] is None


def test_knn_params_are_checked_at_load_time():
    from seed_core.config import ConfigError, parse_params

    params = parse_params({"knn": {"k": 20, "sweep_temperature": [0.05, 0.5]}})
    assert params.knn.sweep_temperature == [0.05, 0.5] and params.knn.sweep_k[0] == 10
    assert parse_params({}).knn.sweep_temperature == [0.03, 0.07, 0.1, 0.2]
    with pytest.raises(ConfigError, match=r"'knn.sweep_k' entries must be >= 1, got \[0, 5\]"):
        parse_params({"knn": {"sweep_k": [0, 5]}})
    with pytest.raises(ConfigError, match=r"'knn.sweep_temperature' entries must be > 0"):
        parse_params({"knn": {"sweep_temperature": [0.07, -0.1]}})
