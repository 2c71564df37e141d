"""Output file names: the webui's ``[token]`` pattern syntax, sanitising, sequence numbers, and
exclusive creation (never overwriting, never leaving the output folder).

The pattern engine is our own implementation of the syntax and results of the webui's
``FilenameGenerator`` (A1111 1.10.1, ``modules/images.py``):

- ``[name]`` or ``[name<arg1><arg2>...]``; names are case-insensitive; arguments are the trailing
  ``<...>`` groups, so ``[datetime<%Y<%m>]`` is the unknown token ``datetime<%Y``.
- A token that is unknown, has no value, rejects its arguments (``[seed<3>]``) or fails (``[prompt_hash<x>]``)
  stays in the name literally as ``[name]``: its case kept, its arguments dropped.
- A token worth :data:`SKIP_PREVIOUS` (``[denoising]`` without denoising, ``[seed_last]``,
  ``[batch_number]`` with a batch of one...) vanishes together with the literal text before it.
- :func:`sanitize_part` is the webui's ``sanitize_filename_part``: ``#<>:"/\\|?*``, newline, CR and tab
  become ``_``, leading spaces go, the part is cut to 128 characters (``--filenames-max-length``), then
  trailing spaces and dots go. ``[prompt]`` (and ``[hasprompt]``) also turn spaces into ``_``;
  ``[prompt_spaces]``, ``[prompt_words]`` and the others keep them.

Deliberate differences, all towards safety or for want of webui state:

- Every value *and the literal text of the pattern* is sanitised (the webui sanitises only prompt-like
  values and never the pattern), so no name holds a path separator: ``/`` in a pattern makes no
  sub-folder, a prompt's ``../`` cannot leave the output folder, and the result as a whole loses leading
  spaces and trailing spaces and dots, so it is never ``.`` or ``..``.
- Every control character, DEL and lone surrogates also become ``_`` (the webui writes them or fails).
- A newline in the pattern becomes ``_``; the webui's pattern regex silently drops the text before it.
- Values the caller does not know stay literal (the webui's result for ``p=None``): ``[clip_skip]``,
  ``[user]``, ``[vae_filename]``, ``[image_hash]`` (pass ``image``)...; ``[seed]`` is empty, as there.
- ``[prompt_no_styles]`` equals ``[prompt_spaces]``: there is no style database to subtract.
- ``[datetime<fmt><zone>]`` uses :mod:`zoneinfo` (same IANA names, looked up case-insensitively as pytz
  does; an unknown zone means local time, as there).
- ``[scheduler]`` with ``Automatic`` resolves through the webui's built-in samplers only
  (:data:`WEBUI_SAMPLERS`); for another sampler it stays literal (the webui fails there too).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import logging
import os
import re
import string
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("vaebatch")

INVALID_CHARS = '#<>:"/\\|?*\n\r\t'
MAX_PART = 128
# The webui's characters, plus every other control character, DEL and lone surrogates.
_UNSAFE = dict.fromkeys((*map(ord, INVALID_CHARS), *range(32), 127, *range(0xD800, 0xE000)), "_")
_TOKEN = re.compile(r"\[([^\[\]]+)\]")
_LAST_ARG = re.compile(r"<([^<>]*)>\Z")
_NON_WORD = re.compile("[\\s" + re.escape(string.punctuation) + "]+")
_DEFAULT_TIME = "%Y%m%d%H%M%S"

# The webui's built-in samplers (1.10.1): name -> (aliases, default scheduler for "Automatic").
WEBUI_SAMPLERS: dict[str, tuple[tuple[str, ...], str]] = {
    "DPM++ 2M": (("k_dpmpp_2m",), "karras"),
    "DPM++ SDE": (("k_dpmpp_sde",), "karras"),
    "DPM++ 2M SDE": (("k_dpmpp_2m_sde",), "exponential"),
    "DPM++ 2M SDE Heun": (("k_dpmpp_2m_sde_heun",), "exponential"),
    "DPM++ 2S a": (("k_dpmpp_2s_a",), "karras"),
    "DPM++ 3M SDE": (("k_dpmpp_3m_sde",), "exponential"),
    "Euler a": (("k_euler_a", "k_euler_ancestral"), "Automatic"),
    "Euler": (("k_euler",), "Automatic"),
    "LMS": (("k_lms",), "Automatic"),
    "Heun": (("k_heun",), "Automatic"),
    "DPM2": (("k_dpm_2",), "karras"),
    "DPM2 a": (("k_dpm_2_a",), "karras"),
    "DPM fast": (("k_dpm_fast",), "Automatic"),
    "DPM adaptive": (("k_dpm_ad",), "Automatic"),
    "Restart": (("restart",), "karras"),
    "DDIM": (("ddim",), "Automatic"),
    "DDIM CFG++": (("ddim_cfgpp",), "Automatic"),
    "PLMS": (("plms",), "Automatic"),
    "UniPC": (("unipc",), "Automatic"),
    "LCM": (("k_lcm",), "Automatic"),
}


class SkipPrevious:
    """A token value that removes itself and the literal text before it (as the webui's)."""


SKIP_PREVIOUS = SkipPrevious()

TokenValue = str | int | float | None | SkipPrevious
Token = TokenValue | Callable[[list[str]], TokenValue]
_TOKEN_ERRORS = (ArithmeticError, AttributeError, LookupError, TypeError, ValueError)
_reported: set[str] = set()


def sanitize_part(text: str, max_length: int = MAX_PART, *, replace_spaces: bool = False) -> str:
    """A file-name-safe fragment, as the webui's ``sanitize_filename_part``: path separators, reserved
    and control characters become ``_`` (and spaces too with ``replace_spaces``), leading spaces go,
    the text is cut to ``max_length`` characters, then trailing spaces and dots go."""
    if replace_spaces:
        text = text.replace(" ", "_")
    return text.translate(_UNSAFE).lstrip(" ")[:max_length].rstrip(" .")


def _no_args(fn: Callable[[], TokenValue]) -> Callable[[list[str]], TokenValue]:
    """A token computed on use that, like the webui's argument-less ones, rejects arguments."""

    def token(args: list[str]) -> TokenValue:
        if args:
            raise TypeError("takes no arguments")
        return fn()

    return token


@functools.lru_cache(maxsize=1)
def _zone_names() -> dict[str, str]:
    try:
        from zoneinfo import available_timezones
    except ImportError:  # pragma: no cover - Python < 3.9
        return {}
    return {name.lower(): name for name in available_timezones()}


def _zone(name: str) -> dt.tzinfo | None:
    """The IANA zone ``name`` (any case, as pytz), or None (local time) when there is none."""
    try:
        from zoneinfo import ZoneInfo
    except ImportError:  # pragma: no cover - Python < 3.9
        return None
    for key in (name, _zone_names().get(name.lower())):
        if key:
            try:
                return ZoneInfo(key)
            except (LookupError, ValueError, OSError):
                continue
    return None


def _datetime(args: list[str], now: dt.datetime) -> str:
    fmt = args[0] if args and args[0] else _DEFAULT_TIME
    when = now.astimezone(_zone(args[1]) if len(args) > 1 else None)
    try:
        text = when.strftime(fmt)
    except (ValueError, TypeError):
        text = when.strftime(_DEFAULT_TIME)
    return sanitize_part(text)


def _hash(data: bytes, args: list[str], default: int | None) -> str:
    length = int(args[0]) if args and args[0] != "" else default
    return hashlib.sha256(data).hexdigest()[:length]


def _text_hash(text: str | None, args: list[str]) -> str:
    if text is None:
        raise ValueError("no text to hash")
    return _hash(text.encode(), args, 8)


def _scheduler_label(sampler: Any, scheduler: Any) -> str:
    name = str(scheduler)
    if name == "Automatic":
        name = WEBUI_SAMPLERS[str(sampler)][1]  # KeyError (literal token) for other samplers
    return name.capitalize()


def _vae_stem(name: str) -> str:
    parts = re.split(r"[\\/]", name)[-1].split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "" else parts[0]


def _styles(styles: str | Sequence[str]) -> str:
    names = [styles] if isinstance(styles, str) else list(styles)
    return sanitize_part(", ".join(s for s in names if s != "None") or "None")


def _is_zero(value: Any) -> bool:
    try:
        return not float(value)
    except (TypeError, ValueError):
        return not value


_PLAIN_TOKENS = (
    "steps", "cfg", "width", "height", "sampler", "model_hash", "model_name", "batch_size", "clip_skip",
    "user", "family", "index", "stem", "source",
)  # fmt: skip


def standard_tokens(values: Mapping[str, Any], *, now: dt.datetime | None = None) -> dict[str, Token]:
    """The webui's tokens, from whatever ``values`` knows; missing values leave their token literal.

    Keys read: ``prompt``, ``negative_prompt``, ``seed``, ``all_seeds``, ``steps``, ``cfg``, ``width``,
    ``height``, ``styles``, ``sampler``, ``scheduler``, ``model_hash``, ``model_name``,
    ``job_timestamp``, ``batch_index``, ``batch_size``, ``n_iter``, ``iteration``, ``clip_skip``,
    ``denoising``, ``user``, ``vae_filename``, ``basename``, ``image`` (for ``[image_hash]``),
    ``max_prompt_words`` (the webui's ``directories_max_prompt_words``, 8), and ours: ``family``,
    ``index``, ``stem``, ``source``. A ``batch_number`` or ``generation_number`` value is used as it
    is instead of being computed from the batch fields.
    """
    when = now or dt.datetime.now()
    get = values.get
    prompt = None if get("prompt") is None else str(get("prompt"))
    negative = None if get("negative_prompt") is None else str(get("negative_prompt"))
    seed, sampler, scheduler = get("seed"), get("sampler"), get("scheduler")
    batch_size, batch_index = get("batch_size"), get("batch_index")

    def seed_first() -> TokenValue:
        if batch_size is None:
            return None
        return seed if int(batch_size) == 1 else get("all_seeds")[0]

    def seed_last() -> TokenValue:
        if batch_size is None:
            return None
        return SKIP_PREVIOUS if int(batch_size) == 1 else get("all_seeds")[-1]

    def batch_number() -> TokenValue:
        if get("batch_number") is not None:
            return get("batch_number")
        if batch_size is None:
            return None
        return SKIP_PREVIOUS if int(batch_size) == 1 else int(batch_index) + 1

    def generation_number() -> TokenValue:
        if get("generation_number") is not None:
            return get("generation_number")
        if batch_size is None or get("n_iter") is None:
            return None
        if int(get("n_iter")) == 1 and int(batch_size) == 1:
            return SKIP_PREVIOUS
        return int(get("iteration")) * int(batch_size) + int(batch_index) + 1

    def scheduler_token(with_sampler: bool) -> Token:
        def token() -> TokenValue:
            if sampler is None and scheduler is None:
                return None
            if sampler is None or scheduler is None:
                return SKIP_PREVIOUS  # the webui's answer when p has no scheduler
            label = _scheduler_label(sampler, scheduler)
            return sanitize_part(f"{sampler} {label}" if with_sampler else label)

        return _no_args(token)

    def prompt_words() -> TokenValue:
        words = [w for w in _NON_WORD.split(prompt or "") if w] or ["empty"]
        limit = get("max_prompt_words")
        return sanitize_part(" ".join(words[: 8 if limit is None else int(limit)]))

    def hasprompt(args: list[str]) -> TokenValue:
        if prompt is None:
            return None
        lower = prompt.lower()
        out = ""
        for arg in filter(None, args):
            expected, _, rest = arg.partition("|")
            default = rest.split("|", 1)[0]
            out += expected.lower() if expected.lower() in lower else default
        return sanitize_part(out, replace_spaces=True)

    def image_hash(args: list[str]) -> TokenValue:
        image = get("image")
        return None if image is None else _hash(image.tobytes(), args, None)

    def if_prompt(fn: Callable[[str], TokenValue]) -> Token:
        return _no_args(lambda: None if prompt is None else fn(prompt))

    tokens: dict[str, Token] = {
        "basename": get("basename") or "img",
        "seed": "" if seed is None else seed,
        "seed_first": _no_args(seed_first),
        "seed_last": _no_args(seed_last),
        "scheduler": scheduler_token(False),
        "sampler_scheduler": scheduler_token(True),
        "date": _no_args(lambda: when.strftime("%Y-%m-%d")),
        "datetime": lambda args: _datetime(args, when),
        "job_timestamp": get("job_timestamp") or when.strftime(_DEFAULT_TIME),
        "prompt_hash": lambda args: _text_hash(prompt, args),
        "negative_prompt_hash": lambda args: _text_hash(negative, args),
        "full_prompt_hash": lambda args: _text_hash(
            None if prompt is None or negative is None else f"{prompt} {negative}", args
        ),
        "prompt": if_prompt(lambda p: sanitize_part(p, replace_spaces=True)),
        "prompt_no_styles": if_prompt(sanitize_part),
        "prompt_spaces": if_prompt(sanitize_part),
        "prompt_words": _no_args(prompt_words),
        "batch_number": _no_args(batch_number),
        "generation_number": _no_args(generation_number),
        "hasprompt": hasprompt,
        "denoising": _no_args(lambda: SKIP_PREVIOUS if _is_zero(get("denoising")) else get("denoising")),
        "none": "",
        "image_hash": image_hash,
    }
    if get("styles") is not None:
        tokens["styles"] = _no_args(lambda: _styles(get("styles")))
    if get("vae_filename") is not None:
        tokens["vae_filename"] = _no_args(lambda: _vae_stem(str(get("vae_filename"))))
    for key in _PLAIN_TOKENS:
        if get(key) is not None:
            tokens[key] = get(key)
    return tokens


def _resolve(tokens: Mapping[str, Token], name: str, args: list[str]) -> TokenValue:
    token = tokens.get(name.lower())
    if token is None:
        return None
    try:
        if callable(token):
            return token(args)
        if args:
            raise TypeError("takes no arguments")
        return token
    except _TOKEN_ERRORS as exc:
        key = name.lower()
        if key not in _reported:  # once per token, not once per image
            _reported.add(key)
            log.warning("file name pattern: [%s] failed (%s); left as it is", name, exc)
        return None


def apply_pattern(pattern: str, tokens: Mapping[str, Token], *, max_length: int = MAX_PART) -> str:
    """Replace ``[token]`` / ``[token<arg>...]`` in ``pattern`` as the webui's ``FilenameGenerator``
    does (see the module docstring); every value is cut to ``max_length`` and everything, pattern text
    included, is sanitised, so the result never holds a path separator."""
    out: list[str] = []
    pos = 0
    for m in _TOKEN.finditer(pattern):
        literal = pattern[pos : m.start()]
        pos = m.end()
        name, args = m.group(1), []
        while arg := _LAST_ARG.search(name):
            args.insert(0, arg.group(1))
            name = name[: arg.start()]
        value = _resolve(tokens, name, args)
        if isinstance(value, SkipPrevious):
            continue
        out.append(literal.translate(_UNSAFE))
        if value is None:
            out.append(f"[{name}]".translate(_UNSAFE))
        else:
            out.append(sanitize_part(str(value), max_length))
    out.append(pattern[pos:].translate(_UNSAFE))
    return "".join(out).lstrip(" ").rstrip(" .")


def next_sequence_number(directory: str | Path, basename: str = "") -> int:
    """The webui's ``get_next_sequence_number``: one more than the largest number that starts a name
    in ``directory`` (``NNNNN-...``, ``NNNNN.png``; after ``<basename>-`` when given), 0 when none."""
    prefix = f"{basename}-" if basename else ""
    best = -1
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.startswith(prefix):
                head = os.path.splitext(entry.name[len(prefix) :])[0].split("-", 1)[0]
                if head.isascii() and head.isdigit():
                    best = max(best, int(head))
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
    scanned once for the highest number, then numbers count up (skipping names that exist).
    Safe to share between threads: each number is handed out once (background image writers)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._next = next_sequence_number(self.directory)
        self._name_max = _name_max(self.directory)
        self._lock = threading.Lock()

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
            with self._lock:
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
