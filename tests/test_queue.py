import pytest
import torch

from seed_core.queue import EmbeddingQueue


def fifo_reference(size: int, batches: list[torch.Tensor]) -> torch.Tensor:
    """Ring buffer semantics, one row at a time."""
    buf = torch.zeros(size, batches[0].shape[1])
    ptr = 0
    for batch in batches:
        for row in batch:
            buf[ptr] = row
            ptr = (ptr + 1) % size
    return buf


def test_wraps_around_when_size_is_not_a_multiple_of_the_batch() -> None:
    queue = EmbeddingQueue(size=10, dim=3)
    batches = [torch.full((4, 3), float(i)) + torch.arange(4).view(4, 1) / 10 for i in range(7)]
    for b in batches:
        queue.enqueue(b)
    torch.testing.assert_close(queue.buffer, fifo_reference(10, batches))
    assert queue.ptr == (7 * 4) % 10


def test_enqueue_of_the_whole_queue_and_errors() -> None:
    queue = EmbeddingQueue(size=5, dim=2)
    queue.enqueue(torch.ones(3, 2))
    keys = torch.arange(10.0).view(5, 2)
    queue.enqueue(keys)  # starts at 3, wraps
    torch.testing.assert_close(queue.buffer, fifo_reference(5, [torch.ones(3, 2), keys]))
    with pytest.raises(ValueError, match="cannot enqueue 6 keys into a queue of 5"):
        queue.enqueue(torch.zeros(6, 2))


def test_state_round_trip_and_shape_check() -> None:
    queue = EmbeddingQueue(size=6, dim=4)
    queue.fill_random(torch.Generator().manual_seed(0))
    queue.enqueue(torch.ones(4, 4))
    other = EmbeddingQueue(size=6, dim=4)
    other.load_state_dict(queue.state_dict())
    torch.testing.assert_close(other.buffer, queue.buffer)
    assert other.ptr == queue.ptr == 4
    with pytest.raises(ValueError, match="differs from the configured"):
        EmbeddingQueue(size=7, dim=4).load_state_dict(queue.state_dict())


def test_random_fill_is_unit_norm_and_seeded() -> None:
    a, b = EmbeddingQueue(8, 5), EmbeddingQueue(8, 5)
    a.fill_random(torch.Generator().manual_seed(3))
    b.fill_random(torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.buffer.norm(dim=1), torch.ones(8))
    torch.testing.assert_close(a.buffer, b.buffer)


def test_fill_from_cache_checks_shape() -> None:
    queue = EmbeddingQueue(4, 3)
    queue.fill(torch.arange(18.0).view(6, 3))
    torch.testing.assert_close(queue.buffer, torch.arange(12.0).view(4, 3))
    with pytest.raises(ValueError, match="need at least 4 embeddings of width 3"):
        queue.fill(torch.zeros(3, 3))
