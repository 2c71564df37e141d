"""Images in and out: loading any PIL-readable image safely, preparing it for encode (EXIF
orientation, alpha, odd modes, size to a multiple of 8), and turning decoded tensors into images."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

Fit = Literal["crop", "resize"]
Alpha = Literal["composite", "drop"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".avif")
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 8192x8192; far beyond what a VAE encode handles


class ImageInputError(ValueError):
    """An image that cannot be used; the message names it and the problem."""


@dataclass
class PreparedImage:
    source: str
    original_size: tuple[int, int]  # (width, height) after EXIF orientation, before crop/resize
    pixels: torch.Tensor  # uint8 [3, H, W], H and W multiples of 8

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[2]), int(self.pixels.shape[1])


def declared_webp_size(head: bytes) -> tuple[int, int] | None:
    """The canvas size a WebP file's first 30 bytes declare (None: not a WebP header).

    Pillow's WebP plugin allocates the whole canvas while *opening* the file, before its
    decompression-bomb check, so a few bytes declaring 16M x 16M exhaust memory; callers check
    this size first."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    kind = head[12:16]
    if kind == b"VP8X":
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if kind == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 ":
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def check_declared_size(fp: BinaryIO, name: str, max_pixels: int) -> None:
    """Refuse a file whose header declares more than ``max_pixels`` where opening it would
    allocate that much (WebP); ``fp`` is left where it was."""
    pos = fp.tell()
    head = fp.read(30)
    fp.seek(pos)
    size = declared_webp_size(head)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageInputError(f"{name}: {size[0]}x{size[1]} is larger than the {max_pixels}-pixel limit")


def open_image(
    source: str | Path | bytes | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open and fully load an image, refusing decompression bombs before decoding pixel data."""
    if isinstance(source, Image.Image):
        return source
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ImageInputError(f"{name}: cannot read ({exc.strerror or exc})") from None
    with fp:
        try:
            check_declared_size(fp, name, max_pixels)
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageInputError(f"{name}: {w}x{h} is larger than the {max_pixels}-pixel limit")
            img.load()
        except ImageInputError:
            raise
        except Image.DecompressionBombError:
            raise ImageInputError(f"{name}: refused as a decompression bomb") from None
        except UnidentifiedImageError:
            raise ImageInputError(f"{name}: not an image file PIL can read") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageInputError(f"{name}: corrupt or truncated image ({exc})") from None
    return img


def to_rgb_array(img: Image.Image, alpha: Alpha, background: tuple[int, int, int]) -> np.ndarray:
    """Any mode (palette, CMYK, 16-bit, float, with or without alpha) to uint8 RGB ``[H, W, 3]``."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = (
            1.0
            if img.mode == "F" and arr.max(initial=0) <= 1.0
            else (255.0 if arr.max(initial=0) <= 255 else 65535.0)
        )
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa") or "transparency" in img.info
    if has_alpha and alpha == "composite":
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return np.asarray(Image.alpha_composite(base, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def parse_color(text: str) -> tuple[int, int, int]:
    try:
        r, g, b = ImageColor.getrgb(text)[:3]
    except ValueError:
        raise ValueError(f"not a colour: {text!r} (use e.g. #ffffff or white)") from None
    return r, g, b


def prepare_image(
    source: str | Path | bytes | Image.Image,
    *,
    name: str | None = None,
    fit: Fit = "crop",
    alpha: Alpha = "composite",
    background: str = "#ffffff",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Load ``source`` for encoding: EXIF orientation applied, alpha composited on ``background``
    (or dropped), then centre-cropped (``fit="crop"``) or resized (``"resize"``) to multiples of 8."""
    label = name or (
        str(source) if isinstance(source, (str, Path)) else getattr(source, "filename", "") or "<image>"
    )
    img = open_image(source, max_pixels=max_pixels)
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, SyntaxError):
        img = ImageOps.exif_transpose(img) or img  # a broken EXIF block only costs the orientation
    w, h = img.size
    if w < 8 or h < 8:
        raise ImageInputError(f"{label}: {w}x{h} is smaller than the 8x8 minimum")
    rgb = to_rgb_array(img, alpha, parse_color(background))
    if fit == "crop":
        nw, nh = w - w % 8, h - h % 8
        left, top = (w - nw) // 2, (h - nh) // 2
        rgb = rgb[top : top + nh, left : left + nw]
    elif fit == "resize":
        nw, nh = max(8, round(w / 8) * 8), max(8, round(h / 8) * 8)
        if (nw, nh) != (w, h):
            rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.LANCZOS))
    else:
        raise ValueError(f"fit must be 'crop' or 'resize', not {fit!r}")
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8, order="C")).permute(2, 0, 1).contiguous()
    return PreparedImage(label, (w, h), pixels)


def to_unit_range(pixels_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to float [-1, 1]."""
    return pixels_uint8.to(torch.float32) / 127.5 - 1.0


def tensor_to_image(sample: torch.Tensor) -> Image.Image:
    """A decoded sample ``[3, H, W]`` in [-1, 1] to an RGB image (clamped, rounded)."""
    x = ((sample.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB")


def find_images(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted, not recursive)."""
    found: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(p)
    return found
