"""A small, real, mixed training set on disk: PNG/JPEG/WebP of many sizes and aspect ratios in
nested folders, RGBA and palette images, EXIF-rotated JPEGs, and bad files of every kind."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

#: bad files, by name, and a word their index error must contain
BAD = {
    "bad/corrupt.png": "corrupt",
    "bad/truncated.jpg": "truncated",
    "bad/huge.png": "bomb",
    "bad/not-an-image.webp": "not an image",
    "bad/empty.png": "not an image",
}


def _huge_png(width: int, height: int) -> bytes:
    """A PNG header declaring width x height, with a token of data (never decodable as such)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def make_dataset(root: Path, n_good: int = 95, *, seed: int = 0, bad: bool = True) -> list[Path]:
    """``n_good`` good images (64-192 px sides) and, with ``bad``, the files of :data:`BAD`."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_good):
        w, h = int(rng.integers(64, 193)), int(rng.integers(64, 193))
        folder = root / f"set{i % 3}" / ("deep" if i % 5 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        rgb = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        kind = i % 6
        if kind == 0:
            path = folder / f"img{i:03d}.png"
            alpha = Image.fromarray(np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1)))
            rgba = rgb.convert("RGBA")
            rgba.putalpha(alpha)
            rgba.save(path)
        elif kind == 1:
            path = folder / f"img{i:03d}.jpg"
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90° on display: width and height swap
            rgb.save(path, quality=90, exif=exif.tobytes())
        elif kind == 2:
            path = folder / f"img{i:03d}.webp"
            rgb.save(path, quality=90)
        elif kind == 3:
            path = folder / f"img{i:03d}.png"
            rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(path)
        else:
            path = folder / f"img{i:03d}.{'jpg' if kind == 4 else 'png'}"
            rgb.save(path)
        paths.append(path)
    if bad:
        (root / "bad").mkdir(parents=True, exist_ok=True)
        good_png = paths[0].read_bytes()
        mid = len(good_png) // 2  # the header reads, the pixel data does not decompress
        (root / "bad/corrupt.png").write_bytes(good_png[:mid] + b"\x55" * 64 + good_png[mid + 64 :])
        jpg = next(p for p in paths if p.suffix == ".jpg").read_bytes()
        (root / "bad/truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
        (root / "bad/huge.png").write_bytes(_huge_png(30000, 30000))
        (root / "bad/not-an-image.webp").write_text("this is text, not an image\n")
        (root / "bad/empty.png").write_bytes(b"")
        paths += [root / name for name in BAD]
    return paths
