"""Weighted cosine kNN (InstDisc / DINO `eval_knn.py`): pure tensor functions, memory bounded
for ImageNet-size banks. Neighbour search (`knn_neighbors`) and the vote (`knn_vote`) are
separate so one search serves every k of a sweep."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seed_core.evaluation.metrics import check_labels
from seed_core.progress import progress

# Default chunking: 2048 x 32768 fp32 similarities = 256 MiB, large enough for fast GEMMs and
# few enough blocks (a 1.28 M bank and 50 k queries: 1,000) that the per-block work stays small.
TEST_CHUNK = 2048
BANK_CHUNK = 32768
# Columns per group in the block top-k pre-selection (see `block_topk`).
GROUP = 32


def block_topk(sim: torch.Tensor, k: int, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """`sim.topk(k, dim=1)` of a `(M, N)` block, found among few candidates.

    The k largest entries of a row lie in the k groups of `group` columns with the largest
    maxima (a group holding one of them has a maximum at least that large, and at most k groups
    can), so a top-k over the group maxima and one over those k x group candidates replace the
    top-k over all N columns, which dominates the scan's cost on CPU. Equal values may come
    back in another order than `topk` gives them.

    Returns:
        values `(M, k')` in descending order and their column indices `(M, k')`, k' = min(k, N).
    """
    rows, cols = sim.shape
    k = min(k, cols)
    if group < 2 or cols % group or 4 * k * group > cols:
        return sim.topk(k, dim=1)
    maxima = sim.view(rows, cols // group, group).amax(dim=2)
    groups = maxima.topk(k, dim=1, sorted=False).indices
    candidates = (groups.unsqueeze(2) * group
                  + torch.arange(group, device=sim.device)).view(rows, k * group)
    values, pos = sim.gather(1, candidates).topk(k, dim=1)
    return values, candidates.gather(1, pos)


@torch.no_grad()
def knn_neighbors(train_features: torch.Tensor, test_features: torch.Tensor, k: int, *,
                  test_chunk: int = TEST_CHUNK, bank_chunk: int = BANK_CHUNK
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar training rows of every test row, most similar first.

    The bank is scanned in chunks with a running top-k merge, so besides the outputs the peak
    extra memory is about `test_chunk x (bank_chunk x 1.03 + 100 k) + bank_chunk x F` floats
    (one block of similarities and its group maxima, the top-k candidates, one normalised bank
    chunk) whatever the bank size: with the defaults, F = 128 and k = 20, about 300 MiB.

    Args:
        train_features: bank `(N, F)`, any float dtype and device (not modified, not copied).
        test_features: queries `(M, F)`; the computation runs on their device.
        k: neighbours wanted; clamped to N.

    Returns:
        similarities `(M, k')` float32 and bank row indices `(M, k')` int64, k' = min(k, N).
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"features must be 2-D, got bank {tuple(train_features.shape)} and "
                         f"queries {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: bank {train_features.shape[1]}, "
                         f"queries {test_features.shape[1]}")
    if train_features.shape[0] == 0:
        raise ValueError("the kNN bank is empty")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = test_features.device
    bank_size, queries = train_features.shape[0], test_features.shape[0]
    k = min(k, bank_size)
    best_sim = torch.full((queries, k), -math.inf, device=device)
    best_idx = torch.zeros((queries, k), dtype=torch.long, device=device)
    # one similarity buffer reused for every block: fresh large allocations page-fault each time
    buffer = torch.empty(min(test_chunk, queries) * min(bank_chunk, bank_size), device=device)
    # outer loop over the bank: each bank chunk is normalised (and moved) once
    for start in progress(range(0, bank_size, bank_chunk), desc="kNN search",
                          unit="bank chunk", leave=False):
        bank = F.normalize(train_features[start:start + bank_chunk].to(device, torch.float32),
                           dim=1)
        kk = min(k, bank.shape[0])
        for q0 in range(0, queries, test_chunk):
            query = F.normalize(test_features[q0:q0 + test_chunk].to(torch.float32), dim=1)
            sim = buffer[:query.shape[0] * bank.shape[0]].view(query.shape[0], bank.shape[0])
            torch.mm(query, bank.T, out=sim)
            chunk_sim, chunk_idx = block_topk(sim, kk)
            rows = slice(q0, q0 + query.shape[0])
            merged_sim = torch.cat([best_sim[rows], chunk_sim], dim=1)
            merged_idx = torch.cat([best_idx[rows], chunk_idx + start], dim=1)
            top_sim, pos = merged_sim.topk(k, dim=1)
            best_sim[rows] = top_sim
            best_idx[rows] = merged_idx.gather(1, pos)
        del bank  # else the next chunk is normalised while this one is still alive
    return best_sim, best_idx


def knn_vote(similarities: torch.Tensor, neighbor_labels: torch.Tensor, temperature: float,
             num_classes: int) -> torch.Tensor:
    """Class scores `(M, C)` from neighbours `(M, k)`: each votes exp(sim / T) for its class.

    Rows are returned as vote shares (divided by their sum): the same ranking as the raw sums
    exp(sim / T), without their overflow at small T (exp(1 / 0.01) exceeds float32). The only
    `(M, C)` tensor made is the float32 result (50,000 x 1,000 classes: 191 MiB).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # subtracting each row's best similarity scales the row by a constant: ranking unchanged,
    # and every weight lies in (0, 1], so float32 sums of k of them lose nothing that matters
    best = similarities.amax(dim=1, keepdim=True)
    weights = ((similarities - best) / temperature).exp_().float()
    scores = torch.zeros(similarities.shape[0], num_classes, device=similarities.device)
    scores.scatter_add_(1, neighbor_labels, weights)
    return scores.div_(scores.sum(dim=1, keepdim=True))


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, k: int, temperature: float,
                 num_classes: int) -> torch.Tensor:
    """Weighted cosine kNN (InstDisc / DINO): class scores `(M, C)`; argmax = prediction.

    Features are L2-normalised inside. Each of the k nearest training samples (cosine) votes
    for its class with weight exp(sim / T); rows are normalised vote shares (see `knn_vote`).
    k larger than the bank is clamped. Memory stays bounded for ImageNet-size banks.

    Args:
        train_features: `(N, F)`; train_labels: `(N,)` int in [0, C).
        test_features: `(M, F)`.
    """
    if train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(f"{train_features.shape[0]} training features but "
                         f"{train_labels.shape[0]} labels")
    check_labels(train_labels, num_classes, "training labels")
    sims, idx = knn_neighbors(train_features, test_features, k)
    neighbor_labels = train_labels.to(idx.device)[idx]
    return knn_vote(sims, neighbor_labels, temperature, num_classes)


