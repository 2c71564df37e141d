"""What defines a cache's contents (VAE identity, buckets, value, augmentations, storage), its
fingerprint, and the plan that fixes which images go into which shard."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lib_vaebatch.cache.buckets import BucketSpec
from lib_vaebatch.cache.prepare import ALPHA_MODES, AlphaMode
from lib_vaebatch.cache.sources import Item

Format = Literal["latents", "kohya"]
Storage = Literal["fp32", "fp16", "bf16"]
FORMAT_VERSION = 1
STATE = ".vaebatch"  # plan and per-shard records, under OUT
CONFIG = "cache.json"
INDEX = "index.jsonl"


class CacheConflictError(ValueError):
    """An existing OUT made with other settings; the message names them."""


@dataclass(frozen=True)
class CacheSettings:
    vae: dict[str, Any]  # name, hash, family, scaling_factor, shift_factor, channels
    buckets: BucketSpec = field(default_factory=BucketSpec)
    format: Format = "latents"
    flip: bool = False
    alpha: AlphaMode = "drop"
    background: str = "#ffffff"
    sample: bool = False
    seed: int = 0
    storage: Storage = "fp32"
    shard_size: int = 256

    def __post_init__(self) -> None:
        if self.format not in ("latents", "kohya"):
            raise ValueError(f"--format must be latents or kohya, not {self.format!r}")
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"--alpha must be one of {', '.join(ALPHA_MODES)}, not {self.alpha!r}")
        if self.storage not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"storage must be fp32, fp16 or bf16, not {self.storage!r}")
        if self.format == "kohya" and self.storage != "fp32":
            raise ValueError("the kohya format stores float32 (.npz cannot hold bf16); drop --half/--bf16")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, not {self.shard_size}")

    @property
    def orient(self) -> bool:
        """EXIF orientation is applied, except for kohya: sd-scripts reads pixels as stored, and
        names its npz by the stored size."""
        return self.format != "kohya"

    def as_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "format": self.format,
            "vae": dict(self.vae),
            "buckets": self.buckets.as_dict(),
            "flip": self.flip,
            "alpha": self.alpha,
            "background": self.background if self.alpha == "composite" else None,
            "value": "sample" if self.sample else "mean",
            "seed": self.seed if self.sample else None,
            "storage": self.storage,
            "shard_size": self.shard_size,
        }

    @property
    def fingerprint(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [
        f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


@dataclass(frozen=True)
class ShardTask:
    """One shard: a bucket's images, in key order; ``name`` is ``<W>x<H>/part-<k>``."""

    name: str
    bucket: tuple[int, int]
    members: tuple[str, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.safetensors"


def shard_name(bucket: tuple[int, int], k: int) -> str:
    return f"{bucket[0]}x{bucket[1]}/part-{k:05d}"


def make_plan(
    items: list[Item], settings: CacheSettings, old: list[ShardTask] | None = None
) -> list[ShardTask]:
    """Shards of ``shard_size`` images per bucket, in key order. Shards of an ``old`` plan are kept
    as they were (their members that are gone, or moved to another bucket, dropped); images new to
    it fill new shards numbered after the bucket's last."""
    usable = {i.source.key: i for i in items if i.bucket is not None}
    plan: list[ShardTask] = []
    placed: set[str] = set()
    next_k: dict[tuple[int, int], int] = {}
    for task in old or []:
        members = tuple(m for m in task.members if m in usable and usable[m].bucket == task.bucket)
        k = int(task.name.rsplit("-", 1)[1])
        next_k[task.bucket] = max(next_k.get(task.bucket, 0), k + 1)
        placed |= set(members)
        plan.append(ShardTask(task.name, task.bucket, members))
    by_bucket: dict[tuple[int, int], list[str]] = {}
    for key in sorted(usable):
        if key not in placed:
            by_bucket.setdefault(usable[key].bucket, []).append(key)  # type: ignore[arg-type]
    for bucket in sorted(by_bucket):
        keys = by_bucket[bucket]
        k = next_k.get(bucket, 0)
        for start in range(0, len(keys), settings.shard_size):
            plan.append(
                ShardTask(shard_name(bucket, k), bucket, tuple(keys[start : start + settings.shard_size]))
            )
            k += 1
    return [t for t in plan if t.members]


def plan_to_json(plan: list[ShardTask], fingerprint: str) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "shards": [{"name": t.name, "bucket": list(t.bucket), "members": list(t.members)} for t in plan],
    }


def plan_from_json(data: Any, fingerprint: str, path: Path) -> list[ShardTask] | None:
    """The stored plan, or None when it is for other settings or unreadable (then planned anew)."""
    try:
        if data.get("fingerprint") != fingerprint:
            return None
        return [
            ShardTask(
                str(s["name"]), (int(s["bucket"][0]), int(s["bucket"][1])), tuple(map(str, s["members"]))
            )
            for s in data["shards"]
        ]
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return None
