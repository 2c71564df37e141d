"""Reading a ``cache`` output (``--format latents``) back for training: :func:`open_cache`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lib_vaebatch.cache.settings import CONFIG, INDEX
from lib_vaebatch.cache.shards import FLIPPED, MASK
from lib_vaebatch.latents import TENSOR
from lib_vaebatch.tensorfile import open_safetensors


class CacheError(ValueError):
    """A folder that is not a readable latents cache; the message names the problem."""


class LatentCache(Dataset):  # type: ignore[type-arg]
    """A map-style dataset over the cached images (``ok`` and ``recovered``), in index order.

    ``cache[i]`` is a dict: ``latents`` [C, h, w] float32 (scaled, the sampler's space), ``source``,
    ``bucket`` (W, H), ``original_size``, ``crop_ltrb``, and ``latents_flipped`` / ``alpha_mask``
    when the cache has them. Shards are opened lazily and read one row at a time."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        try:
            self.settings = json.loads((self.out / CONFIG).read_text(encoding="utf-8"))
            lines = (self.out / INDEX).read_text(encoding="utf-8").splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError) as exc:
            raise CacheError(f"{self.out}: not a finished cache ({exc})") from None
        if self.settings.get("format") != "latents":
            raise CacheError(f"{self.out}: a {self.settings.get('format')} cache; open_cache reads 'latents'")
        self.records = [r for r in records if r.get("status") in ("ok", "recovered")]
        self._files: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _file(self, shard: str) -> Any:
        if shard not in self._files:
            ctx = open_safetensors(self.out / shard)
            self._files[shard] = (ctx, ctx.__enter__())
        return self._files[shard][1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        f = self._file(rec["shard"])
        row = int(rec["row"])
        item: dict[str, Any] = {
            "latents": f.get_slice(TENSOR)[row : row + 1][0].float(),
            "source": rec["source"],
            "bucket": tuple(rec["bucket"]),
            "original_size": tuple(rec["original_size"]),
            "crop_ltrb": tuple(rec["crop_ltrb"]),
        }
        for name in (FLIPPED, MASK):
            if name in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                item[name] = f.get_slice(name)[row : row + 1][0].float()
        return item

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """Dataset indices by bucket (W, H)."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(self.records):
            out.setdefault(tuple(r["bucket"]), []).append(i)  # type: ignore[arg-type]
        return out

    def iter_buckets(self, batch_size: int = 16) -> Iterator[dict[str, Any]]:
        """Batches of one bucket each (latents stacked [B, C, h, w]), bucket by bucket."""
        for bucket, indices in sorted(self.buckets().items()):
            for start in range(0, len(indices), batch_size):
                items = [self[i] for i in indices[start : start + batch_size]]
                batch: dict[str, Any] = {"bucket": bucket, "indices": indices[start : start + batch_size]}
                for key in items[0].keys() - {"bucket"}:
                    values = [it[key] for it in items]
                    batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
                yield batch

    def close(self) -> None:
        for ctx, _f in self._files.values():
            ctx.__exit__(None, None, None)
        self._files.clear()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the files themselves
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


def open_cache(out: str | Path) -> LatentCache:
    """The cache in ``out`` as a map-style PyTorch dataset (see :class:`LatentCache`)."""
    return LatentCache(out)
