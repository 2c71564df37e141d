"""Saving images with embedded generation metadata, and reading it back.

PNG: a ``parameters`` text chunk (iTXt when the text is not Latin-1). JPEG and WebP: EXIF
UserComment written with piexif in its "unicode" encoding. This is what the webui writes and what
its PNG Info tab reads.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from PIL import Image, PngImagePlugin

from lib_vaebatch.naming import SequentialNamer

log = logging.getLogger("vaebatch")

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
SECTION = "parameters"


def normalize_format(fmt: str) -> str:
    key = fmt.strip().lower().lstrip(".")
    if key not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r} (use png, jpg or webp)")
    return "jpg" if key == "jpeg" else key


def _exif_comment(text: str) -> bytes:
    import piexif
    import piexif.helper

    return piexif.dump(
        {"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(text, encoding="unicode")}}
    )


def encode_image(image: Image.Image, fmt: str, infotext: str | None, *, quality: int = 95) -> bytes:
    """The image file's bytes in ``fmt`` with ``infotext`` embedded."""
    fmt = normalize_format(fmt)
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if infotext is not None:
            info.add_text(SECTION, infotext)
        image.save(buf, "PNG", pnginfo=info)
        return buf.getvalue()
    rgb = image.convert("RGB") if image.mode not in ("RGB", "L") else image
    kwargs: dict[str, object] = {"quality": quality}
    if infotext is not None:
        exif = _exif_comment(infotext)
        if len(exif) > 65000:  # one JPEG APP1 segment; the webui fails here, we keep the image
            log.warning("metadata of %d bytes does not fit in EXIF; saved without it", len(exif))
        else:
            kwargs["exif"] = exif
    rgb.save(buf, FORMATS[fmt], **kwargs)
    return buf.getvalue()


def save_image(
    image: Image.Image,
    namer: SequentialNamer | str | Path,
    decoration: str,
    *,
    fmt: str = "png",
    infotext: str | None = None,
    quality: int = 95,
) -> Path:
    """Save as ``NNNNN-<decoration>.<fmt>`` (never overwriting) and return the path. ``namer`` is a
    :class:`SequentialNamer` (reuse one per folder for long batches) or a folder."""
    fmt = normalize_format(fmt)
    data = encode_image(image, fmt, infotext, quality=quality)
    if not isinstance(namer, SequentialNamer):
        namer = SequentialNamer(namer)
    with namer.create(decoration, f".{fmt}") as (path, fh):
        fh.write(data)
    return path


def read_infotext(source: str | Path | Image.Image) -> str | None:
    """The embedded infotext of a PNG, JPEG or WebP (None when there is none)."""
    img = source if isinstance(source, Image.Image) else Image.open(source)
    try:
        if SECTION in img.info:
            return str(img.info[SECTION])
        exif = img.info.get("exif")
        if exif:
            import piexif
            import piexif.helper

            try:
                comment = piexif.load(exif).get("Exif", {}).get(piexif.ExifIFD.UserComment)
            except (ValueError, KeyError, TypeError, piexif.InvalidImageDataError):
                return None
            if comment:
                try:
                    return piexif.helper.UserComment.load(comment)
                except ValueError:
                    return comment.decode("utf-8", errors="ignore")
        return None
    finally:
        if not isinstance(source, Image.Image):
            img.close()
