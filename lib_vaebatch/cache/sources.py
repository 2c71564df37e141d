"""The manifest: every source image with its header (size, orientation), file identity and
bucket, read without decoding pixels. Folders are searched recursively; a ``.txt`` (one path a
line, ``#`` comments) or ``.json`` (a list of paths) file lists images, relative to the list's
folder."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lib_vaebatch.cache.buckets import BucketError, BucketSpec
from lib_vaebatch.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    ImageInputError,
    check_declared_size,
    open_image,
)

LIST_SUFFIXES = (".txt", ".json")
MIN_SIDE = 8  # as encode: smaller images carry nothing a bucket could use
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class SourceError(ValueError):
    """A SRC argument that cannot be used (missing, an unreadable or malformed list)."""


@dataclass(frozen=True)
class Source:
    path: Path  # absolute
    root: int  # which SRC argument it came from
    rel: str  # its path relative to that SRC (posix), as the index names it

    @property
    def key(self) -> str:
        """Unique across SRC arguments; what the plan and the records are keyed by."""
        return f"{self.root}:{self.rel}"


@dataclass(frozen=True)
class Item:
    """One image of the manifest; ``error`` set (and no bucket) when its header is unusable."""

    source: Source
    size: tuple[int, int] = (0, 0)  # (width, height) as encoded: after EXIF orientation if applied
    stat: tuple[int, int] = (0, 0)  # (bytes, mtime_ns): a changed file is encoded again
    bucket: tuple[int, int] | None = None
    resized: tuple[int, int] | None = None
    error: str | None = None


def seed_offset(rel: str, seed: int, salt: str = "") -> int:
    """A per-image seed from its relative path: the same whatever the order or the workers."""
    digest = hashlib.sha256(f"{seed}\0{rel}\0{salt}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _read_list(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read the list ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SourceError(f"{path}: a JSON list must be a list of path strings")
        return [v for v in value if v.strip()]
    return [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]


def _rel(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def find_sources(srcs: list[str | Path], exclude: Path | None = None) -> list[Source]:
    """Every image under the SRC arguments, sorted, without duplicates; ``exclude`` (the output
    folder) is never searched. A SRC that is not a folder, a readable image or a list of existing
    files is a :class:`SourceError`; images found in folders and lists are checked later, one by
    one (a bad one is a failed record, not an error of the run)."""
    out: list[Source] = []
    seen: set[Path] = set()
    skip = exclude.resolve() if exclude is not None else None

    def add(path: Path, root: int, base: Path) -> None:
        p = path.absolute()
        if p not in seen:
            seen.add(p)
            out.append(Source(p, root, _rel(p, base)))

    for root, given in enumerate(srcs):
        src = Path(given)
        if src.is_dir():
            base = src.absolute()
            found = []
            for dirpath, dirnames, filenames in os.walk(base):
                d = Path(dirpath)
                dirnames[:] = sorted(
                    n
                    for n in dirnames
                    if not n.startswith(".") and (skip is None or (d / n).resolve() != skip)
                )
                found += [d / f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES]
            for f in sorted(found):
                add(f, root, base)
        elif src.is_file() and src.suffix.lower() in LIST_SUFFIXES:
            base = src.absolute().parent
            listed = [p if (p := Path(e)).is_absolute() else base / p for e in _read_list(src)]
            missing = [str(p) for p in listed if not p.is_file()]
            if missing:  # a list with typos is a usage error, not a dataset's bad image
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise SourceError(
                    f"{src}: {len(missing)} listed file(s) do not exist: {', '.join(missing[:3])}{more}"
                )
            for p in listed:
                add(p, root, base)
        elif src.is_file() and src.suffix.lower() in IMAGE_SUFFIXES:
            try:  # an image named on the command line is checked now, like every CLI input
                w, h = open_image(src).size
            except ImageInputError as exc:
                raise SourceError(str(exc)) from None
            if w < MIN_SIDE or h < MIN_SIDE:
                raise SourceError(f"{src}: {w}x{h} is smaller than the {MIN_SIDE}x{MIN_SIDE} minimum")
            add(src, root, src.absolute().parent)
        elif src.is_file():
            raise SourceError(
                f"{src}: not an image ({' '.join(IMAGE_SUFFIXES)}), a folder, or a .txt/.json list of images"
            )
        else:
            raise SourceError(f"{src}: no such file or folder")
    if not out:
        raise SourceError("no images found in " + ", ".join(map(str, srcs)))
    return out


def read_header(source: Source, *, orient: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> Item:
    """Size and orientation from the header alone (no pixel data decoded); problems are the item's
    ``error``, never an exception."""
    p = source.path
    try:
        st = p.stat()
        stat = (int(st.st_size), int(st.st_mtime_ns))
        with open(p, "rb") as fp:
            check_declared_size(fp, source.rel, max_pixels)
            with Image.open(fp) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageInputError(f"{w}x{h} is larger than the {max_pixels}-pixel limit")
                if w < MIN_SIDE or h < MIN_SIDE:
                    raise ImageInputError(f"{w}x{h} is smaller than the {MIN_SIDE}x{MIN_SIDE} minimum")
                if orient:
                    try:
                        rotated = img.getexif().get(0x0112) in _ROTATED
                    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
                        rotated = False  # a broken EXIF block only costs the orientation
                    if rotated:
                        w, h = h, w
    except FileNotFoundError:
        return Item(source, error="no such file")
    except OSError as exc:
        if isinstance(exc, UnidentifiedImageError):
            return Item(source, error="not an image file PIL can read")
        return Item(source, error=f"cannot read ({exc.strerror or exc})")
    except ImageInputError as exc:
        return Item(source, error=str(exc).removeprefix(f"{source.rel}: "))
    except Image.DecompressionBombError:
        return Item(source, error="refused as a decompression bomb")
    except (ValueError, SyntaxError, EOFError) as exc:
        return Item(source, error=f"corrupt image header ({exc})")
    return Item(source, (w, h), stat)


def assign(item: Item, spec: BucketSpec) -> Item:
    if item.error is not None:
        return item
    try:
        bucket, resized = spec.select(*item.size)
    except BucketError as exc:
        return Item(item.source, item.size, item.stat, error=str(exc))
    return Item(item.source, item.size, item.stat, bucket, resized)


def build_manifest(sources: list[Source], spec: BucketSpec, *, orient: bool) -> list[Item]:
    return [assign(read_header(s, orient=orient), spec) for s in sources]
