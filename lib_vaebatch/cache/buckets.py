"""Aspect-ratio buckets as kohya-ss/sd-scripts assigns them (``library/train_util.py``
``BucketManager`` and ``library/model_util.py`` ``make_bucket_resolutions``, sd3 branch of
2026-02): predefined buckets under a maximum area, or with ``no_upscale`` a bucket cut from the
image itself; then a resize so the image covers the bucket, and a centre crop.

The rules are re-implemented here from their description (same arithmetic, same tie-breaking),
and checked against sd-scripts' own ``BucketManager`` by ``tests/cache/test_sdscripts_live.py``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

import numpy as np


class BucketError(ValueError):
    """Bucket settings that cannot work, or an image no bucket fits; the message says which."""


@dataclass(frozen=True)
class BucketSpec:
    """``resolution``: the largest area is ``resolution``²; buckets step by ``steps`` pixels between
    ``min_reso`` and ``max_reso`` on each side (sd-scripts' defaults: 64, 256, 1024)."""

    resolution: int = 512
    steps: int = 64
    min_reso: int = 256
    max_reso: int = 1024
    no_upscale: bool = False

    def __post_init__(self) -> None:
        if self.steps < 8 or self.steps % 8:
            raise BucketError(f"--bucket-reso-steps must be a multiple of 8 (the VAE's), not {self.steps}")
        if self.resolution < self.steps:
            raise BucketError(f"--resolution {self.resolution} is smaller than one step ({self.steps})")
        if self.max_reso < self.resolution:
            raise BucketError(
                f"--max-bucket-reso {self.max_reso} must be at least --resolution {self.resolution}"
            )
        if self.max_reso < self.min_reso:
            raise BucketError(
                f"--max-bucket-reso {self.max_reso} must be at least --min-bucket-reso {self.min_reso}"
            )
        if not self.no_upscale and self.min_reso < self.steps:
            raise BucketError(f"--min-bucket-reso {self.min_reso} is smaller than one step ({self.steps})")

    @property
    def max_area(self) -> int:
        return self.resolution * self.resolution

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @cached_property
    def predefined(self) -> list[tuple[int, int]]:
        """The (width, height) buckets, sorted (unused with ``no_upscale``)."""
        area, step = self.max_area, self.steps
        resos = {(int(math.sqrt(area) // step) * step,) * 2}
        width = self.min_reso
        while width <= self.max_reso:
            height = min(self.max_reso, int((area // width) // step) * step)
            if height >= self.min_reso:
                resos |= {(width, height), (height, width)}
            width += step
        return sorted(resos)

    @cached_property
    def _ratios(self) -> np.ndarray:
        return np.array([w / h for w, h in self.predefined])

    def _round(self, x: float) -> int:
        n = int(x + 0.5)
        return n - n % self.steps

    def select(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(bucket, resized_size)`` for an image of ``width`` x ``height``: it is resized to
        ``resized_size`` (covering the bucket) and centre-cropped to ``bucket``."""
        if width < 1 or height < 1:
            raise BucketError(f"image size {width}x{height} is empty")
        ratio = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in set(self.predefined):
                reso = self.predefined[int(np.abs(self._ratios - ratio).argmin())]
            scale = reso[1] / height if ratio > reso[0] / reso[1] else reso[0] / width
            return reso, (int(width * scale + 0.5), int(height * scale + 0.5))
        if width * height > self.max_area:
            rw = math.sqrt(self.max_area * ratio)
            rh = self.max_area / rw
            bw = self._round(rw)
            bh_w = self._round(bw / ratio)
            bh = self._round(rh)
            bw_h = self._round(bh * ratio)
            if bh_w == 0 or bh == 0:
                raise BucketError(f"image {width}x{height} is too narrow for a {self.steps}-pixel step")
            if abs(bw / bh_w - ratio) < abs(bw_h / bh - ratio):
                resized = (bw, int(bw / ratio + 0.5))
            else:
                resized = (int(bh * ratio + 0.5), bh)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if bucket[0] == 0 or bucket[1] == 0:
            raise BucketError(
                f"image {width}x{height} is smaller than one {self.steps}-pixel bucket step on a side"
            )
        return bucket, resized


def crop_ltrb(bucket: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """sd-scripts' ``crop_ltrb`` for SDXL's crop conditioning: where the image, scaled to fit inside
    the bucket, sits in it (left, top, right, bottom; fractional where the arithmetic is)."""
    bucket_ratio = bucket[0] / bucket[1]
    image_ratio = image_size[0] / image_size[1]
    if bucket_ratio > image_ratio:
        rw, rh = bucket[1] * image_ratio, bucket[1]
    else:
        rw, rh = bucket[0], bucket[0] / image_ratio
    left, top = (bucket[0] - rw) // 2, (bucket[1] - rh) // 2
    return left, top, left + rw, top + rh
