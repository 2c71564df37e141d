"""One image of a shard, ready to encode: decoded (safely), oriented, alpha handled, resized to
cover its bucket and centre-cropped as sd-scripts does (``trim_and_resize_if_required``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from lib_vaebatch.cache.buckets import crop_ltrb
from lib_vaebatch.cache.sources import Item
from lib_vaebatch.images import DEFAULT_MAX_PIXELS, ImageInputError, open_image, parse_color, to_rgb_array

AlphaMode = Literal["drop", "composite", "mask"]
ALPHA_MODES = ("drop", "composite", "mask")


@dataclass
class PreparedItem:
    pixels: np.ndarray  # uint8 [3, H, W], the bucket's size
    mask: np.ndarray | None  # float32 [H, W] in [0, 1] (alpha "mask")
    original_size: tuple[int, int]
    crop_ltrb: tuple[float, float, float, float]


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """sd-scripts' default: area averaging when shrinking both sides (cv2 INTER_AREA there, PIL's
    box filter here: the same area weights, rounding may differ by one level), else Lanczos."""
    if img.size == size:
        return img
    shrink = img.size[0] >= size[0] and img.size[1] >= size[1]
    return img.resize(size, Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS)


def _trim(arr: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    h, w = arr.shape[:2]
    left, top = (w - bucket[0]) // 2, (h - bucket[1]) // 2
    return arr[top : top + bucket[1], left : left + bucket[0]]


def prepare_item(
    item: Item,
    *,
    alpha: AlphaMode = "drop",
    background: str = "#ffffff",
    orient: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedItem:
    """Raises :class:`ImageInputError` (naming the problem) for an image that cannot be used."""
    if item.bucket is None or item.resized is None:
        raise ImageInputError(item.error or "no bucket")
    img = open_image(item.source.path, max_pixels=max_pixels)
    if orient:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError, SyntaxError):
            img = ImageOps.exif_transpose(img) or img
    if img.size != item.size:
        raise ImageInputError(f"decodes to {img.size[0]}x{img.size[1]}, its header said {item.size}")
    mask = None
    if alpha == "mask":
        rgba = (
            img.convert("RGBA")
            if img.mode in ("RGBA", "LA", "PA", "P") or "transparency" in img.info
            else None
        )
        if rgba is not None:
            band = _resize(rgba.getchannel("A"), item.resized)
            mask = _trim(np.asarray(band, dtype=np.float32) / 255.0, item.bucket)
    rgb = to_rgb_array(img, "composite" if alpha == "composite" else "drop", parse_color(background))
    rgb = _trim(np.asarray(_resize(Image.fromarray(rgb), item.resized)), item.bucket)
    if alpha == "mask" and mask is None:
        mask = np.ones(rgb.shape[:2], dtype=np.float32)
    pixels = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.uint8)
    return PreparedItem(
        pixels,
        None if mask is None else np.ascontiguousarray(mask, dtype=np.float32),
        item.size,
        crop_ltrb(item.bucket, item.size),
    )
