"""The VAE and inputs shared by the memory-limit test and its child process (seeded, CPU)."""

from __future__ import annotations

import torch

from tests.support import tiny_backend

#: Samples per job and latent size: big enough that whole values dwarf one tile's working set.
N, SIZE = 2, 40


def limit_backend():  # type: ignore[no-untyped-def]
    return tiny_backend(layers_per_block=1, seed=3)


def inputs(op: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if op == "decode":
        return torch.randn(N, 4, SIZE, SIZE, generator=g)
    return torch.rand(N, 3, SIZE * 8, SIZE * 8, generator=g) * 2 - 1
