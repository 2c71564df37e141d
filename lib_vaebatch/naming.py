"""Output file names: the webui's ``[token]`` pattern syntax, sanitising, sequence numbers, and
exclusive creation (never overwriting, never leaving the output folder)."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

_TOKEN = re.compile(r"\[(\w+)((?:<[^>]*>)*)\]")
_ARG = re.compile(r"<([^>]*)>")
INVALID_CHARS = '#<>:"/\\|?*\n\r\t'
MAX_PART = 128


class SkipPrevious:
    """A token value that removes itself and the literal text before it (as the webui's)."""


SKIP_PREVIOUS = SkipPrevious()

TokenValue = str | int | float | None | SkipPrevious
Token = TokenValue | Callable[[list[str]], TokenValue]


def sanitize_part(text: str, max_length: int = MAX_PART) -> str:
    """A file-name-safe fragment: path separators, reserved and control characters become ``_``."""
    out = "".join("_" if (c in INVALID_CHARS or ord(c) < 32 or ord(c) == 127) else c for c in text)
    out = out.strip()[:max_length]
    return out.rstrip(". ")


def _datetime(args: list[str], now: dt.datetime) -> str:
    fmt = args[0] if args and args[0] else "%Y%m%d%H%M%S"
    when = now
    if len(args) > 1 and args[1]:
        try:
            from zoneinfo import ZoneInfo

            when = now.astimezone(ZoneInfo(args[1]))
        except (ImportError, KeyError, ValueError):
            pass  # unknown zone: local time, as the webui does
    try:
        return when.strftime(fmt)
    except ValueError:
        return now.strftime("%Y%m%d%H%M%S")


def _hash(text: str, args: list[str]) -> str:
    n = int(args[0]) if args and args[0].isdigit() else 8
    return hashlib.sha256(text.encode()).hexdigest()[:n]


_SIMPLE_TOKENS = (
    "seed", "steps", "cfg", "sampler", "scheduler", "width", "height", "model_name", "model_hash",
    "vae_filename", "batch_number", "family", "index", "stem", "source", "denoising", "clip_skip",
)  # fmt: skip


def standard_tokens(values: Mapping[str, Any], *, now: dt.datetime | None = None) -> dict[str, Token]:
    """Tokens available everywhere, from whatever ``values`` knows (prompt, seed, width...)."""
    when = now or dt.datetime.now()
    prompt = str(values.get("prompt") or "")
    negative = str(values.get("negative_prompt") or "")

    def words(args: list[str]) -> TokenValue:
        parts = [w for w in re.split(r"[\s,]+", prompt) if w]
        return " ".join(parts[: int(values.get("max_prompt_words", 8))]) or None

    tokens: dict[str, Token] = {
        "date": when.strftime("%Y-%m-%d"),
        "datetime": lambda args: _datetime(args, when),
        "job_timestamp": values.get("job_timestamp") or when.strftime("%Y%m%d%H%M%S"),
        "none": "",
        "prompt": prompt or None,
        "prompt_spaces": prompt or None,
        "prompt_no_styles": prompt or None,
        "prompt_words": words,
        "prompt_hash": lambda args: _hash(prompt, args),
        "negative_prompt_hash": lambda args: _hash(negative, args),
        "full_prompt_hash": lambda args: _hash(prompt + negative, args),
    }
    for key in _SIMPLE_TOKENS:
        if values.get(key) not in (None, ""):
            tokens[key] = values[key]
    return tokens


def apply_pattern(pattern: str, tokens: Mapping[str, Token], *, max_length: int = MAX_PART) -> str:
    """Replace ``[token]`` / ``[token<arg>...]``. Unknown tokens, tokens with no value and tokens
    whose function fails are left literally, as the webui leaves them; every value is sanitised
    (so a prompt cannot carry ``/`` or ``..`` into a path)."""
    out: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(pattern):
        literal = pattern[pos : m.start()]
        pos = m.end()
        name = m.group(1).lower()
        args = _ARG.findall(m.group(2))
        token = tokens.get(name)
        try:
            value = token(args) if callable(token) else token
        except (ValueError, TypeError, KeyError, IndexError):
            value = None
        if isinstance(value, SkipPrevious):
            continue
        out.append(literal)
        out.append(m.group(0) if value is None else sanitize_part(str(value), max_length))
    out.append(pattern[pos:])
    return sanitize_part("".join(out), max_length * 2)


_SEQ = re.compile(r"^(\d+)-")


def next_sequence_number(directory: str | Path) -> int:
    """One more than the largest ``NNNNN-`` prefix in ``directory`` (0 when none)."""
    best = -1
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if m := _SEQ.match(entry.name):
                best = max(best, int(m.group(1)))
    return best + 1


def _name_max(directory: Path) -> int:
    try:
        return int(os.statvfs(directory).f_namemax)
    except (AttributeError, OSError):
        return 255


def inside(directory: Path, path: Path) -> bool:
    """Whether ``path`` resolves to a location inside ``directory``."""
    root = directory.resolve()
    target = path.resolve()
    return target == root or root in target.parents


class SequentialNamer:
    """Creates ``NNNNN-<decoration><suffix>`` files in one folder, never overwriting: the folder is
    scanned once for the highest number, then numbers count up (skipping names that exist)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._next = next_sequence_number(self.directory)
        self._name_max = _name_max(self.directory)

    def _fit(self, decoration: str, suffix: str) -> str:
        limit = self._name_max - len(suffix.encode()) - 12
        deco = decoration
        while len(deco.encode()) > limit:
            deco = deco[:-1]
        return deco.rstrip(". ")

    @contextlib.contextmanager
    def create(self, decoration: str, suffix: str) -> Iterator[tuple[Path, IO[bytes]]]:
        """Open a new file for writing; a failed write removes the partial file."""
        deco = self._fit(decoration, suffix)
        for _ in range(100_000):
            seq = self._next
            self._next += 1
            name = f"{seq:05}-{deco}{suffix}" if deco else f"{seq:05}{suffix}"
            path = self.directory / name
            if not inside(self.directory, path):
                raise ValueError(f"refusing a file name that leaves the output folder: {name!r}")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
            except FileExistsError:
                continue
            ok = False
            try:
                with os.fdopen(fd, "wb") as fh:
                    yield path, fh
                ok = True
            finally:
                if not ok:
                    with contextlib.suppress(OSError):
                        path.unlink()
            return
        raise FileExistsError(f"no free file name in {self.directory} for {decoration!r}")


def publish(tmp: Path, final: Path, *, overwrite: bool) -> None:
    """Move a finished temporary file into place; without ``overwrite``, atomically refuse an
    existing target (hard link where the file system has them)."""
    try:
        if overwrite:
            tmp.replace(final)
            return
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise FileExistsError(f"{final} exists (not overwritten)") from None
        except OSError:  # no hard links here (e.g. FAT): check, then rename
            if final.exists():
                raise FileExistsError(f"{final} exists (not overwritten)") from None
            tmp.replace(final)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
