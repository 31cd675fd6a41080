"""A FIFO queue of embeddings (MoCo's negatives, SEED's instance bank)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class EmbeddingQueue:
    """`K` embeddings of width `D` in a ring buffer; the oldest are overwritten first.

    K need not be a multiple of the batch: an enqueue that crosses the end wraps around.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.buffer = torch.zeros(size, dim, device=device)
        self.ptr = 0

    @property
    def size(self) -> int:
        return self.buffer.shape[0]

    def fill_random(self, generator: torch.Generator | None = None) -> None:
        """Random unit vectors, as SEED's and MoCo's released code start."""
        noise = torch.randn(self.buffer.shape, generator=generator)
        self.buffer.copy_(F.normalize(noise, dim=1))
        self.ptr = 0

    def fill(self, embeddings: torch.Tensor) -> None:
        """Fill with given embeddings `(N, D)`, N >= K (e.g. cached teacher embeddings)."""
        if embeddings.shape[0] < self.size or embeddings.shape[1] != self.buffer.shape[1]:
            raise ValueError(f"need at least {self.size} embeddings of width "
                             f"{self.buffer.shape[1]}, got {tuple(embeddings.shape)}")
        self.buffer.copy_(embeddings[:self.size])
        self.ptr = 0

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest `B` entries with `keys` `(B, D)` (B <= K), in order."""
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of {self.size}")
        first = min(n, self.size - self.ptr)
        self.buffer[self.ptr:self.ptr + first] = keys[:first]
        if first < n:
            self.buffer[:n - first] = keys[first:]
        self.ptr = (self.ptr + n) % self.size

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.detach().cpu().clone(), "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise ValueError(f"queue shape {tuple(state['buffer'].shape)} in the checkpoint "
                             f"differs from the configured {tuple(self.buffer.shape)}")
        self.buffer.copy_(state["buffer"])
        self.ptr = int(state["ptr"])
