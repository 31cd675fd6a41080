import math

import pytest
import torch

from seed_core.evaluation.features import check_feature_tensors
from seed_core.evaluation.knn import knn_classify, knn_neighbors
from seed_core.evaluation.linear import (LinearDiverged, linear_lr, predict_linear, select_lr,
                                         train_linear)
from seed_core.evaluation.metrics import nan_to_none, per_class_accuracy, topk_accuracy
from seed_core.evaluation.splits import holdout_split


def naive_knn(train, train_labels, test, k, temperature, num_classes):
    """One query at a time, straight from the definition (float64)."""
    train = torch.nn.functional.normalize(train.double(), dim=1)
    test = torch.nn.functional.normalize(test.double(), dim=1)
    k = min(k, train.shape[0])
    out = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    for i in range(test.shape[0]):
        sims = [(float(train[j] @ test[i]), j) for j in range(train.shape[0])]
        sims.sort(reverse=True)
        for sim, j in sims[:k]:
            out[i, int(train_labels[j])] += math.exp(sim / temperature)
    return out / out.sum(dim=1, keepdim=True)


def random_data(n_train=150, n_test=40, dim=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g) * 3  # unnormalised on purpose
    test = torch.randn(n_test, dim, generator=g)
    labels = torch.randint(0, classes, (n_train,), generator=g)
    return train, labels, test


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (37, 0.03)])
def test_knn_matches_naive_reference(k, temperature):
    train, labels, test = random_data()
    got = knn_classify(train, labels, test, k, temperature, 5)
    want = naive_knn(train, labels, test, k, temperature, 5)
    assert got.shape == (40, 5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_knn_k_larger_than_bank_is_clamped():
    train, labels, test = random_data(n_train=12)
    got = knn_classify(train, labels, test, 50, 0.1, 5)
    torch.testing.assert_close(got.double(), naive_knn(train, labels, test, 50, 0.1, 5),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("test_chunk,bank_chunk", [(7, 13), (1, 1), (40, 3), (1000, 149)])
def test_knn_chunked_equals_unchunked(test_chunk, bank_chunk):
    train, labels, test = random_data(n_train=300, n_test=50)
    full_sim, full_idx = knn_neighbors(train, test, 20, test_chunk=10**6, bank_chunk=10**6)
    sim, idx = knn_neighbors(train, test, 20, test_chunk=test_chunk, bank_chunk=bank_chunk)
    assert torch.equal(idx, full_idx)
    torch.testing.assert_close(sim, full_sim)
    assert bool((sim[:, :-1] >= sim[:, 1:]).all()), "neighbours must come most similar first"


def test_knn_small_temperature_does_not_overflow():
    train, labels, test = random_data()
    scores = knn_classify(train, labels, test, 20, 0.001, 5)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.sum(1), torch.ones(40))


def test_knn_rejects_bad_input():
    train, labels, test = random_data()
    with pytest.raises(ValueError, match="feature widths differ"):
        knn_classify(train, labels, test[:, :3], 5, 0.07, 5)
    with pytest.raises(ValueError, match=r"training labels must lie in \[0, 3\)"):
        knn_classify(train, labels, test, 5, 0.07, 3)
    with pytest.raises(ValueError, match="bank is empty"):
        knn_classify(train[:0], labels[:0], test, 5, 0.07, 5)


def test_topk_accuracy_and_per_class():
    scores = torch.tensor([[0.9, 0.05, 0.03, 0.02],   # pred 0, label 0 -> top1
                           [0.1, 0.2, 0.6, 0.1],      # pred 2, label 1 -> top2 only
                           [0.4, 0.3, 0.2, 0.1]])     # pred 0, label 3 -> top4 only
    labels = torch.tensor([0, 1, 3])
    acc = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc == pytest.approx({"top1": 100 / 3, "top2": 200 / 3, "top5": 100.0})
    per_class = per_class_accuracy(scores.argmax(1), labels, 5)
    assert per_class[0] == 100.0 and per_class[1] == 0.0 and per_class[3] == 0.0
    assert math.isnan(per_class[2]) and math.isnan(per_class[4])
    assert nan_to_none(per_class)[:3] == [100.0, 0.0, None]


def test_holdout_split_is_balanced_disjoint_covering_deterministic():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20 + [3])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(1))]
    fit, hold = holdout_split(labels, 0.1, seed=3)
    assert torch.equal(torch.sort(torch.cat([fit, hold])).values, torch.arange(labels.numel()))
    assert not set(fit.tolist()) & set(hold.tolist())
    assert torch.bincount(labels[hold], minlength=4).tolist() == [5, 3, 2, 0]
    fit2, hold2 = holdout_split(labels, 0.1, seed=3)
    assert torch.equal(hold, hold2) and torch.equal(fit, fit2)
    _, hold3 = holdout_split(labels, 0.1, seed=4)
    assert not torch.equal(hold, hold3)


def test_linear_lr_schedule_follows_moco():
    lrs = [linear_lr(30.0, e, 100) for e in range(100)]
    assert lrs[59] == 30.0 and lrs[60] == pytest.approx(3.0) and lrs[80] == pytest.approx(0.3)
    assert [linear_lr(1.0, e, 1) for e in range(1)] == [1.0]


def separable_data(n=600, dim=20, classes=4, seed=0, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * spread
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def test_linear_probe_learns_separable_data_and_loss_falls():
    x, y = separable_data()
    losses = []
    fc = train_linear(x[:500], y[:500], 4, epochs=10, lr=0.1, batch_size=64, momentum=0.9,
                         weight_decay=0.0, seed=0, device="cpu",
                         on_epoch=lambda epoch, loss: losses.append(loss))
    assert len(losses) == 10 and losses[-1] < 0.2 * losses[0]
    acc = topk_accuracy(predict_linear(fc, x[500:]), y[500:])
    assert acc["top1"] > 95.0
    # the seed fixes init and batch order
    fc2 = train_linear(x[:500], y[:500], 4, epochs=10, lr=0.1, batch_size=64, momentum=0.9,
                          weight_decay=0.0, seed=0, device="cpu")
    assert torch.equal(fc.weight, fc2.weight)


def select_on_holdout(x, y, lrs, epochs):
    """The cached-feature lr search stages/linear.py runs: fit split trains, holdout scores."""
    fit, hold = holdout_split(y, 0.2, 0)
    return select_lr(lrs, lambda lr: train_linear(x[fit], y[fit], 4, epochs, lr, 64, 0.9,
                                                        0.0, 0, "cpu"), x[hold], y[hold])


def test_select_lr_picks_best_and_survives_divergence():
    x, y = separable_data(spread=0.7)  # overlapping classes: the lr matters
    sel = select_on_holdout(x, y, [1e-4, 0.1, 1e38], epochs=5)
    assert sel.best_lr == 0.1
    assert sel.lr_top1[1e38] is None  # diverged
    assert sel.lr_top1[0.1] > sel.lr_top1[1e-4]
    assert sel.holdout["top1"] == sel.lr_top1[0.1]
    with pytest.raises(LinearDiverged, match="every lr"):
        select_on_holdout(x, y, [1e38], epochs=2)


def test_check_feature_tensors_names_the_file():
    good = {"features": torch.zeros(3, 2), "labels": torch.zeros(3), "index": torch.arange(3)}
    check_feature_tensors(good, "x.safetensors")
    with pytest.raises(ValueError, match=r"x.safetensors: missing tensors \['index'\]"):
        check_feature_tensors({"features": torch.zeros(3, 2), "labels": torch.zeros(3)},
                                 "x.safetensors")
    with pytest.raises(ValueError, match="'labels' has 2 rows"):
        check_feature_tensors({**good, "labels": torch.zeros(2)}, "x.safetensors")
