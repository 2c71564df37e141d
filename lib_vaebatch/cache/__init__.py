"""Dataset latent caches for training (``python -m lib_vaebatch cache``): kohya-style aspect
buckets, sharded safetensors (or sd-scripts' npz), resumable, in-process or on Ray Data."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from lib_vaebatch.cache.reader import LatentCache


def open_cache(out: str | Path) -> LatentCache:
    """The cache in ``out`` as a map-style PyTorch dataset (:class:`~.reader.LatentCache`)."""
    from lib_vaebatch.cache.reader import open_cache as _open

    return _open(out)


__all__ = ["open_cache"]
