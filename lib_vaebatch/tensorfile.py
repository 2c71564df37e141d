"""Safe reading of ``.safetensors`` files: the header is parsed and checked before any tensor data
is touched, so corrupt files and headers declaring absurd shapes get a clear error, not an
allocation. No pickle is ever involved.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors

_SAFETENSORS_ERROR: type[Exception] = getattr(safetensors, "SafetensorError", OSError)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


class TensorFileError(ValueError):
    """A file that is not a valid safetensors file; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES.get(self.dtype, 8)


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor names with dtype and shape, and the string metadata, checked against the file size."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TensorFileError(f"{p}: truncated (no safetensors header)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length + 8 > size:
                raise TensorFileError(f"{p}: corrupt safetensors header (declares {length} header bytes)")
            raw = f.read(length)
    except OSError as exc:
        raise TensorFileError(f"{p}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise TensorFileError(f"{p}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{p}: corrupt safetensors header (not a JSON object)")
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
        raise TensorFileError(f"{p}: safetensors metadata must map strings to strings")
    data_bytes = size - 8 - length
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        info = _tensor_info(p, name, entry)
        start, end = entry["data_offsets"]
        if end - start != info.nbytes or end > data_bytes:
            raise TensorFileError(
                f"{p}: tensor {name!r} declares shape {list(info.shape)} ({info.nbytes} bytes) "
                f"but the file holds {max(0, min(end, data_bytes) - start)} bytes for it"
            )
        infos[name] = info
    return infos, dict(meta_raw)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_info(p: Path, name: str, entry: Any) -> TensorInfo:
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and isinstance(entry.get("shape"), list)
        and all(_is_count(d) for d in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(_is_count(o) for o in entry["data_offsets"])
        and entry["data_offsets"][0] <= entry["data_offsets"][1]
    )
    if not ok:
        raise TensorFileError(f"{p}: corrupt safetensors entry for tensor {name!r}")
    return TensorInfo(entry["dtype"], tuple(entry["shape"]))


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safetensors.safe_open`` (CPU, torch) after :func:`read_header` has vetted the file."""
    read_header(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except (_SAFETENSORS_ERROR, OSError, RuntimeError) as exc:
        raise TensorFileError(f"{path}: not a readable safetensors file ({exc})") from None
