"""Saving images with embedded generation metadata, and reading it back, as the webui does
(A1111 1.10.1 ``modules/images.py``: ``save_image_with_geninfo`` and ``read_info_from_image``).

- PNG: a ``parameters`` text chunk (tEXt, or iTXt when the text is not Latin-1, as Pillow chooses).
- JPEG, WebP: EXIF UserComment written with piexif in its "unicode" (UTF-16) encoding. JPEG keeps
  EXIF in one 64 KiB segment: a longer infotext is left out with a warning (the webui fails there).
- AVIF: the same EXIF, where Pillow can write AVIF (its own plugin from Pillow 11.3 when built with
  libavif, or the ``pillow-avif-plugin`` package the webui uses); :func:`normalize_format` says
  clearly when neither is there.
- Images too large for the format (JPEG over 65535 px, WebP over 16383 px a side) are saved as PNG,
  as the webui does (:func:`format_for`).

Reading (:func:`read_info`) follows the webui's precedence: the PNG ``parameters`` text, replaced
by a non-empty EXIF UserComment (JPEG, WebP, AVIF, or a PNG's eXIf), else a GIF ``comment``; NovelAI
PNGs are converted to an infotext.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import struct
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from lib_vaebatch.naming import WEBUI_SAMPLERS, SequentialNamer

log = logging.getLogger("vaebatch")

FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
SECTION = "parameters"
MAX_SIDE = {"jpg": 65535, "webp": 16383}
# A str holds surrogates only unpaired (e.g. from JSON "\ud800"): no UTF-8/16 can encode them.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_JPEG_SEGMENT = 65533  # bytes of payload in one JPEG APP1 segment (Pillow's own limit)
# Keys of Image.info that are not generation parameters (the webui's IGNORED_INFO_KEYS).
IGNORED_INFO_KEYS = frozenset({
    "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
    "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop",
})  # fmt: skip


@functools.lru_cache(maxsize=1)
def avif_available() -> bool:
    """Whether Pillow can write AVIF here (Pillow's own plugin, or ``pillow_avif`` once imported)."""
    Image.init()
    if "AVIF" in Image.SAVE:
        return True
    try:
        import pillow_avif  # noqa: F401  (registers the AVIF plugin with Pillow)
    except ImportError:
        return False
    return "AVIF" in Image.SAVE


def normalize_format(fmt: str) -> str:
    """``png``, ``jpg``, ``webp`` or ``avif`` from any spelling (``.JPEG``...); ValueError otherwise,
    or for AVIF when this Pillow cannot write it."""
    key = fmt.strip().lower().lstrip(".")
    if key not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r} (use png, jpg, webp or avif)")
    if key == "avif" and not avif_available():
        raise ValueError(
            f"AVIF is not available: Pillow {Image.__version__} here cannot write it; it needs Pillow 11.3 "
            "or newer built with libavif, or the pillow-avif-plugin package"
        )
    return "jpg" if key == "jpeg" else key


def format_for(image: Image.Image, fmt: str) -> str:
    """``fmt``, or ``png`` when the image is too large for it (as the webui switches)."""
    fmt = normalize_format(fmt)
    limit = MAX_SIDE.get(fmt)
    if limit is not None and max(image.size) > limit:
        log.warning("%dx%d is too large for %s; saving as PNG", *image.size, fmt.upper())
        return "png"
    return fmt


def exif_user_comment(text: str) -> bytes:
    """EXIF holding ``text`` as UserComment, encoded as the webui writes it."""
    import piexif
    import piexif.helper

    return piexif.dump(
        {"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(text, encoding="unicode")}}
    )


def _for_exif_format(image: Image.Image, fmt: str) -> Image.Image:
    if image.mode.startswith("I;16"):  # 16-bit grey: scale to 8 bits, as the webui does
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if fmt == "avif":
        keep = ("RGB", "RGBA")
        return image if image.mode in keep else image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return image if image.mode in ("RGB", "L") else image.convert("RGB")


def encode_image(
    image: Image.Image, fmt: str, infotext: str | None, *, quality: int = 95, lossless: bool = False
) -> bytes:
    """The image file's bytes in ``fmt`` with ``infotext`` embedded (``lossless`` is for WebP)."""
    fmt = normalize_format(fmt)
    if infotext is not None:
        infotext = _LONE_SURROGATE.sub("\ufffd", infotext)
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if infotext is not None:
            info.add_text(SECTION, infotext)
        image.save(buf, "PNG", pnginfo=info)
        return buf.getvalue()
    kwargs: dict[str, object] = {"quality": quality}
    if fmt == "webp":
        kwargs["lossless"] = lossless
    if infotext is not None:
        exif = exif_user_comment(infotext)
        if fmt == "jpg" and len(exif) > _JPEG_SEGMENT:
            log.warning("metadata of %d bytes does not fit in JPEG EXIF; saved without it", len(exif))
        else:
            kwargs["exif"] = exif
    _for_exif_format(image, fmt).save(buf, FORMATS[fmt], **kwargs)
    return buf.getvalue()


def save_image(
    image: Image.Image,
    namer: SequentialNamer | str | Path,
    decoration: str,
    *,
    fmt: str = "png",
    infotext: str | None = None,
    quality: int = 95,
    lossless: bool = False,
) -> Path:
    """Save as ``NNNNN-<decoration>.<fmt>`` (never overwriting) and return the path. ``namer`` is a
    :class:`SequentialNamer` (reuse one per folder for long batches) or a folder."""
    fmt = format_for(image, fmt)
    data = encode_image(image, fmt, infotext, quality=quality, lossless=lossless)
    if not isinstance(namer, SequentialNamer):
        namer = SequentialNamer(namer)
    with namer.create(decoration, f".{fmt}") as (path, fh):
        fh.write(data)
    return path


_EXIF_IFD_POINTER = 0x8769
_USER_COMMENT = 0x9286


def _user_comment_bytes(data: bytes) -> bytes | None:
    """The raw UserComment of EXIF bytes (TIFF, ``Exif\\0\\0`` + TIFF, or a JPEG holding them), read
    with every offset and count checked against the data. piexif's ``load`` trusts the counts: a
    damaged count of 2**32 makes it build a format string of that length (MemoryError after
    minutes, gigabytes of memory)."""
    if data.startswith(b"\xff\xd8"):
        at = data.find(b"Exif\x00\x00")
        if at < 0:
            return None
        data = data[at:]
    if data.startswith(b"Exif"):
        data = data[6:]
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8:
        return None

    def entries(offset: int) -> dict[int, tuple[int, int, int]]:
        if offset + 2 > len(data):
            return {}
        (n,) = struct.unpack_from(order + "H", data, offset)
        found = {}
        for i in range(n):
            at = offset + 2 + 12 * i
            if at + 12 > len(data):
                break
            tag, kind, count = struct.unpack_from(order + "HHL", data, at)
            found[tag] = (kind, count, at + 8)
        return found

    (ifd0,) = struct.unpack_from(order + "L", data, 4)
    pointer = entries(ifd0).get(_EXIF_IFD_POINTER)
    if pointer is None:
        return None
    (exif_ifd,) = struct.unpack_from(order + "L", data, pointer[2])
    comment = entries(exif_ifd).get(_USER_COMMENT)
    if comment is None or comment[0] not in (2, 7):  # ASCII or UNDEFINED bytes
        return None
    count, at = comment[1], comment[2]
    if count > 4:
        (at,) = struct.unpack_from(order + "L", data, at)
    if at + count > len(data):
        return None
    return data[at : at + count]


def _exif_comment(data: Any) -> str:
    """The UserComment of raw EXIF bytes, decoded as the webui does ("" when there is none)."""
    import piexif.helper

    if not isinstance(data, bytes):
        return ""
    comment = _user_comment_bytes(data)
    if not comment:
        return ""
    try:
        return piexif.helper.UserComment.load(comment)
    except ValueError:
        return comment.decode("utf-8", errors="ignore")


@functools.lru_cache(maxsize=1)
def _sampler_aliases() -> dict[str, str]:
    names = {name.lower(): name for name in WEBUI_SAMPLERS}
    names.update({alias.lower(): name for name, (aliases, _) in WEBUI_SAMPLERS.items() for alias in aliases})
    return names


def _novelai(items: dict[str, Any], size: tuple[int, int]) -> str | None:
    try:
        meta = json.loads(items["Comment"])
        sampler = _sampler_aliases().get(meta["sampler"], "Euler a")
        return (
            f"{items['Description']}\nNegative prompt: {meta['uc']}\n"
            f"Steps: {meta['steps']}, Sampler: {sampler}, CFG scale: {meta['scale']}, Seed: {meta['seed']}, "
            f"Size: {size[0]}x{size[1]}, Clip skip: 2, ENSD: 31337"
        )
    except (ValueError, LookupError, TypeError) as exc:
        log.warning("could not read NovelAI generation parameters: %s", exc)
        return None


def read_info(source: str | Path | Image.Image) -> tuple[str | None, dict[str, Any]]:
    """``(infotext or None, other info items)`` of an image or image file, as the webui's
    ``read_info_from_image``. A file that is not a readable image raises OSError (PIL's
    UnidentifiedImageError, a missing file) or ValueError (damaged, or declaring a size too large
    to open), nothing else."""
    if isinstance(source, Image.Image):
        return _read_info(source)
    from lib_vaebatch.images import DEFAULT_MAX_PIXELS, check_declared_size

    avif_available()  # registers pillow_avif, if it is there, so AVIF files open
    with open(source, "rb") as fp:
        check_declared_size(fp, str(source), DEFAULT_MAX_PIXELS)  # ImageInputError is a ValueError
        try:
            with Image.open(fp) as img:
                return _read_info(img)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"{source}: {exc}") from None
        except (SyntaxError, EOFError, struct.error) as exc:  # damaged headers, as some plugins say it
            raise ValueError(f"{source}: not a readable image ({exc})") from None


def _read_info(img: Image.Image) -> tuple[str | None, dict[str, Any]]:
    items = dict(img.info or {})
    geninfo = items.pop(SECTION, None)
    if "exif" in items:
        geninfo = _exif_comment(items["exif"]) or geninfo
    elif "comment" in items:  # GIF
        comment = items["comment"]
        geninfo = comment.decode("utf-8", errors="ignore") if isinstance(comment, bytes) else comment
    for key in IGNORED_INFO_KEYS:
        items.pop(key, None)
    if items.get("Software") == "NovelAI":
        geninfo = _novelai(items, img.size) or geninfo
    return (None if geninfo is None else str(geninfo)), items


def read_infotext(source: str | Path | Image.Image) -> str | None:
    """The embedded infotext of a PNG, JPEG, WebP, AVIF or GIF (None when there is none)."""
    return read_info(source)[0]
