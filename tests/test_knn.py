"""The kNN scan's block top-k: the same neighbours as a plain top-k, found among fewer
candidates (see `seed_core.evaluation.knn.block_topk`)."""

import pytest
import torch

from seed_core.evaluation.knn import block_topk, knn_neighbors, knn_vote


@pytest.mark.parametrize("rows,cols,k,group", [(7, 4096, 20, 32), (3, 640, 5, 32),
                                               (5, 2048, 1, 16), (4, 1000, 3, 8)])
def test_block_topk_equals_topk(rows: int, cols: int, k: int, group: int) -> None:
    sim = torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols + k))
    values, idx = block_topk(sim, k, group)
    want_values, want_idx = sim.topk(k, dim=1)
    assert torch.equal(values, want_values) and torch.equal(idx, want_idx)


def test_block_topk_finds_neighbours_crowded_into_one_group() -> None:
    """All k best in one group, and a group whose maximum is high but whose other members are
    low: the pre-selection must keep every group that can hold a top-k entry."""
    sim = torch.zeros(2, 1024)
    sim[0, 64:84] = torch.linspace(2.0, 1.0, 20)  # the top 20 inside one group of 32
    sim[1, ::32] = torch.linspace(3.0, 2.0, 32)  # one high entry at the start of each group
    values, idx = block_topk(sim, 20, 32)
    want_values, want_idx = sim.topk(20, dim=1)
    assert torch.equal(values, want_values) and torch.equal(idx, want_idx)


def test_block_topk_falls_back_when_grouping_cannot_help() -> None:
    sim = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    for k, group in [(30, 32), (5, 1), (200, 32)]:  # k x group too large, no groups, k > N
        values, idx = block_topk(sim, k, group)
        want_values, want_idx = sim.topk(min(k, 100), dim=1)
        assert torch.equal(values, want_values) and torch.equal(idx, want_idx)


def test_knn_neighbors_with_grouped_blocks_equals_one_plain_topk() -> None:
    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(9000, 32, generator=g), torch.randn(50, 32, generator=g)
    sim, idx = knn_neighbors(bank, queries, 10, test_chunk=16, bank_chunk=4096)
    plain = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(
        bank, dim=1).T
    want_sim, want_idx = plain.topk(10, dim=1)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(sim, want_sim)


def test_knn_vote_takes_the_row_maximum_whatever_the_order() -> None:
    """Similarities need not come sorted: shifting by the row's maximum keeps every weight in
    (0, 1] even at a tiny temperature, and the shares equal the float64 definition."""
    sims = torch.tensor([[0.2, 0.9, 0.5], [0.7, 0.1, 0.8]])
    labels = torch.tensor([[0, 1, 2], [2, 0, 1]])
    for temperature in (0.001, 0.07, 1.0):
        exact = sims.double()
        raw = torch.zeros(2, 3, dtype=torch.float64)  # exp(sim / T) / exp(max / T), in float64
        raw.scatter_add_(1, labels, ((exact - exact.amax(1, keepdim=True)) / temperature).exp())
        want = raw / raw.sum(1, keepdim=True)
        got = knn_vote(sims, labels, temperature, 3)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
