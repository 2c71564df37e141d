"""Reading PyTorch ``.pt``/``.pth`` files without unpickling anything.

``torch.save`` writes a zip archive: ``<archive>/data.pkl`` (a pickle describing the saved object),
``<archive>/data/<key>`` (the raw bytes of each storage), ``<archive>/byteorder`` and version records.
``torch.load`` and ``pickle.load`` would execute whatever that pickle names, so neither is used here:
``data.pkl`` is walked with :func:`pickletools.genops`, which only decodes opcodes, and a small
whitelisted subset of opcodes is interpreted by this module. The only callables a file may name are
``torch._utils._rebuild_tensor_v2``, ``torch._utils._rebuild_parameter`` and ``collections.OrderedDict``
(each replaced by our own code), plus the storage classes as type tags. Anything else is refused by name
before it could do anything, and every size is checked before memory is allocated.

What can be read: tensors (float32/16, bfloat16, float64, integer types; any strides or storage
offset, storages shared between tensors), nested dicts, OrderedDicts, lists and tuples of them, and plain
strings, bytes, numbers, booleans and ``None``.
"""

from __future__ import annotations

import _compat_pickle
import math
import pickletools
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_MAX_ELEMENTS = 1 << 31  # per tensor and per storage; callers pass their own cap
MAX_PICKLE_BYTES = 16 * 1024 * 1024
MAX_OPCODES = 1_000_000
MAX_MARK_DEPTH = 64  # nested MARKs (tuples/lists being built)
MAX_NESTING = 32  # containers inside containers in the result
MAX_ENTRIES = 100_000  # zip members
MAX_NDIM = 16

# torch.save (protocol 2) writes ``\x80\x02\x8a\x0a`` + this number first in the legacy, non-zip format.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class PtFileError(ValueError):
    """A ``.pt`` file that is refused or unreadable; ``str()`` is one line: ``<path>: <problem>``."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: torch.dtype
    np_dtype: str  # little-endian; bfloat16 is read as its int16 bits and viewed afterwards

    @property
    def itemsize(self) -> int:
        return np.dtype(self.np_dtype).itemsize


_STORAGE_TYPES = {
    st.name: st
    for st in (
        _StorageType("FloatStorage", torch.float32, "<f4"),
        _StorageType("HalfStorage", torch.float16, "<f2"),
        _StorageType("BFloat16Storage", torch.bfloat16, "<i2"),
        _StorageType("DoubleStorage", torch.float64, "<f8"),
        _StorageType("ByteStorage", torch.uint8, "|u1"),
        _StorageType("CharStorage", torch.int8, "|i1"),
        _StorageType("ShortStorage", torch.int16, "<i2"),
        _StorageType("IntStorage", torch.int32, "<i4"),
        _StorageType("LongStorage", torch.int64, "<i8"),
    )
}


@dataclass(frozen=True)
class _Callable:
    """An allowlisted global; REDUCE dispatches on ``name`` to our own implementation."""

    name: str


_REBUILD_TENSOR = _Callable("torch._utils._rebuild_tensor_v2")
_REBUILD_PARAMETER = _Callable("torch._utils._rebuild_parameter")
_ORDERED_DICT = _Callable("collections.OrderedDict")
_GLOBALS: dict[str, _Callable | _StorageType] = {
    c.name: c for c in (_REBUILD_TENSOR, _REBUILD_PARAMETER, _ORDERED_DICT)
} | {f"torch.{name}": st for name, st in _STORAGE_TYPES.items()}


@dataclass(frozen=True)
class StorageRef:
    """A storage in the archive: ``data/<key>`` holding ``numel`` items of ``kind``."""

    key: str
    kind: _StorageType
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor described by the pickle; its data is read only by :meth:`PtArchive.tensor`."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.kind.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


_SCALARS = (str, bytes, int, float, bool, type(None))


def _show(text: str) -> str:
    return text if text.isprintable() and len(text) <= 100 else repr(text[:100])


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Interpreter:
    """Walks ``data.pkl`` opcode by opcode; never imports or calls anything the file names."""

    def __init__(self, path: Path, entries: dict[str, zipfile.ZipInfo], prefix: str, max_elements: int):
        self.path = path
        self.entries = entries
        self.prefix = prefix
        self.max_elements = max_elements
        self.storages: dict[str, StorageRef] = {}
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    def fail(self, problem: str) -> PtFileError:
        return PtFileError(self.path, problem)

    def pop(self) -> Any:
        if not self.stack:
            raise self.fail("corrupt data.pkl (stack underflow)")
        return self.stack.pop()

    def push(self, value: Any) -> None:
        self.stack.append(value)  # self.stack is replaced at each MARK: never cache its append

    def top(self) -> Any:
        if not self.stack:
            raise self.fail("corrupt data.pkl (stack underflow)")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise self.fail("corrupt data.pkl (no MARK)")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def run(self, data: bytes) -> Any:
        try:
            for count, (op, arg, _pos) in enumerate(pickletools.genops(data), 1):
                if count > MAX_OPCODES:
                    raise self.fail(f"data.pkl has more than {MAX_OPCODES} opcodes")
                if op.name == "STOP":
                    result = self.pop()
                    if self.stack or self.metastack:
                        raise self.fail("corrupt data.pkl (items left on the stack)")
                    return result
                self.step(op.name, arg)
        except PtFileError:
            raise
        except (ValueError, struct.error, EOFError, OverflowError, Warning) as exc:
            # genops' own decoding errors: unknown opcode, truncated argument, bad UTF-8; Warning when
            # run with -W error (it decodes protocol-0 string arguments before we can refuse them)
            raise self.fail(f"corrupt data.pkl ({_show(str(exc))})") from None
        raise self.fail("corrupt data.pkl (no STOP)")

    def step(self, name: str, arg: Any) -> None:
        if name == "PROTO":
            if not 2 <= arg <= 5:
                raise self.fail(f"unsupported pickle protocol {arg}")
        elif name == "FRAME":
            pass
        elif name == "MARK":
            if len(self.metastack) >= MAX_MARK_DEPTH:
                raise self.fail("data.pkl is nested too deeply")
            self.metastack.append(self.stack)
            self.stack = []
        elif name == "POP":
            self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "EMPTY_DICT":
            self.push({})
        elif name == "EMPTY_LIST":
            self.push([])
        elif name == "EMPTY_TUPLE":
            self.push(())
        elif name == "TUPLE":
            self.push(tuple(self.pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [self.pop() for _ in range(n)]
            self.push(tuple(reversed(items)))
        elif name == "LIST":
            self.push(self.pop_mark())
        elif name == "DICT":
            d: dict[Any, Any] = {}
            self.set_items(d, self.pop_mark())
            self.push(d)
        elif name in (
            "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
            "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
        ):  # fmt: skip
            self.push(arg)
        elif name in ("NEWTRUE", "NEWFALSE", "NONE"):
            self.push({"NEWTRUE": True, "NEWFALSE": False, "NONE": None}[name])
        elif name in ("BINPUT", "LONG_BINPUT"):
            self.memo[arg] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in ("BINGET", "LONG_BINGET"):
            if arg not in self.memo:
                raise self.fail(f"corrupt data.pkl (memo entry {arg} missing)")
            self.push(self.memo[arg])
        elif name == "SETITEM":
            value = self.pop()
            key = self.pop()
            self.set_items(self.top(), [key, value])
        elif name == "SETITEMS":
            items = self.pop_mark()
            self.set_items(self.top(), items)
        elif name in ("APPEND", "APPENDS"):
            items = [self.pop()] if name == "APPEND" else self.pop_mark()
            target = self.top()
            if not isinstance(target, list):
                raise self.fail(f"corrupt data.pkl ({name} on a {type(target).__name__})")
            target.extend(items)
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            self.push(self.resolve(module, attr))
        elif name == "STACK_GLOBAL":
            attr = self.pop()
            module = self.pop()
            if not isinstance(module, str) or not isinstance(attr, str):
                raise self.fail("corrupt data.pkl (STACK_GLOBAL needs two strings)")
            self.push(self.resolve(module, attr))
        elif name == "REDUCE":
            args = self.pop()
            func = self.pop()
            self.push(self.reduce(func, args))
        elif name == "BUILD":
            state = self.pop()
            if state not in (None, {}):
                raise self.fail(f"refused: object state (BUILD) on a {type(self.top()).__name__}")
        elif name == "BINPERSID":
            self.push(self.persistent(self.pop()))
        else:
            raise self.fail(f"refused: pickle opcode {name} is not allowed")

    def set_items(self, target: Any, items: list[Any]) -> None:
        if not isinstance(target, dict):
            raise self.fail(f"corrupt data.pkl (SETITEM on a {type(target).__name__})")
        if len(items) % 2:
            raise self.fail("corrupt data.pkl (odd number of dict items)")
        for key, value in zip(items[::2], items[1::2], strict=True):
            # scalar keys only: no hashing of attacker-built nested tuples
            if not isinstance(key, _SCALARS):
                raise self.fail(f"refused: a dict key of type {type(key).__name__}")
            target[key] = value

    def resolve(self, module: str, attr: str) -> Any:
        # the Python 2 names protocol <= 2 writes (__builtin__.eval, commands.call) under the names
        # pickle would import, as pickle.Unpickler.find_class maps them
        if (module, attr) in _compat_pickle.NAME_MAPPING:
            module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        name = f"{module}.{attr}"
        found = _GLOBALS.get(name)
        if found is None:
            raise self.fail(f"refused: the pickle references {_show(name)} (only tensors are loaded)")
        return found

    def reduce(self, func: Any, args: Any) -> Any:
        if not isinstance(func, _Callable) or not isinstance(args, tuple):
            what = func.name if isinstance(func, _StorageType) else type(func).__name__
            raise self.fail(f"refused: REDUCE on {_show(what)}")
        if func is _ORDERED_DICT:
            result: OrderedDict[Any, Any] = OrderedDict()
            if args:
                pairs = args[0]
                if len(args) != 1 or not isinstance(pairs, list | tuple):
                    raise self.fail("refused: OrderedDict with unexpected arguments")
                for pair in pairs:
                    if not isinstance(pair, list | tuple) or len(pair) != 2:
                        raise self.fail("refused: OrderedDict with unexpected arguments")
                    self.set_items(result, list(pair))
            return result
        if func is _REBUILD_PARAMETER:
            if len(args) != 3 or not isinstance(args[0], TensorRef) or args[2]:
                raise self.fail("refused: a Parameter with unexpected arguments or hooks")
            return args[0]
        return self.rebuild_tensor(args)

    def rebuild_tensor(self, args: tuple[Any, ...]) -> TensorRef:
        if len(args) not in (6, 7):
            raise self.fail("corrupt data.pkl (tensor with unexpected arguments)")
        storage, offset, shape, stride, _requires_grad, hooks = args[:6]
        metadata = args[6] if len(args) == 7 else None
        if not isinstance(storage, StorageRef):
            raise self.fail("corrupt data.pkl (tensor without a storage)")
        if hooks or metadata:
            raise self.fail("refused: a tensor with hooks or extra metadata")
        ok = (
            _is_int(offset)
            and isinstance(shape, tuple)
            and isinstance(stride, tuple)
            and len(shape) == len(stride) <= MAX_NDIM
            and all(_is_int(v) and v >= 0 for v in (offset, *shape, *stride))
        )
        if not ok:
            raise self.fail("corrupt data.pkl (tensor with a bad shape, stride or offset)")
        numel = math.prod(shape)
        if numel > self.max_elements:
            raise self.fail(f"tensor declares shape {list(shape)}: too large")
        if numel:
            last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
            inside = last < storage.numel
        else:
            inside = offset <= storage.numel
        if not inside:
            raise self.fail(f"tensor of shape {list(shape)} reaches outside its storage {storage.key!r}")
        return TensorRef(storage, offset, shape, stride)

    def persistent(self, pid: Any) -> StorageRef:
        ok = (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)
            and _is_int(pid[4])
            and pid[4] >= 0
        )
        if not ok:
            raise self.fail("refused: a persistent id that is not a tensor storage")
        _, kind, key, _location, numel = pid
        if not _KEY.fullmatch(key) or key in (".", ".."):
            raise self.fail(f"refused: storage key {_show(key)}")
        if numel > self.max_elements:
            raise self.fail(f"storage {key!r} declares {numel} elements: too large")
        known = self.storages.get(key)
        if known is not None:
            if (known.kind, known.numel) != (kind, numel):
                raise self.fail(f"storage {key!r} is declared twice with different types or sizes")
            return known
        info = self.entries.get(f"{self.prefix}/data/{key}")
        if info is None:
            raise self.fail(f"storage {key!r} has no data entry")
        if info.file_size != numel * kind.itemsize:
            raise self.fail(
                f"data entry for storage {key!r} holds {info.file_size} bytes, "
                f"expected {numel} × {kind.itemsize}"
            )
        ref = StorageRef(key, kind, numel)
        self.storages[key] = ref
        return ref


# zipfile raises NotImplementedError for unknown versions and flags, RuntimeError for encryption
_ZIP_ERRORS = (
    zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error,
    NotImplementedError, RuntimeError,
)  # fmt: skip


class PtArchive:
    """An opened ``.pt`` file. ``obj`` is the saved object with :class:`TensorRef` in place of each
    tensor; tensor data is read only by :meth:`tensor`. Use as a context manager."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str, obj: Any) -> None:
        self.path = path
        self.obj = obj
        self._zf = zf
        self._prefix = prefix
        self._raw: dict[str, bytes] = {}

    def __enter__(self) -> PtArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zf.close()
        self._raw.clear()

    def _storage_bytes(self, storage: StorageRef) -> bytes:
        if storage.key not in self._raw:
            try:
                raw = self._zf.read(f"{self._prefix}/data/{storage.key}")
            except _ZIP_ERRORS as exc:
                raise PtFileError(self.path, f"unreadable data entry {storage.key!r} ({exc})") from None
            if len(raw) != storage.numel * storage.kind.itemsize:
                raise PtFileError(self.path, f"data entry {storage.key!r} is truncated")
            self._raw[storage.key] = raw
        return self._raw[storage.key]

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """A new contiguous CPU tensor with the values ``ref`` describes."""
        kind = ref.storage.kind
        if ref.numel == 0:
            return torch.empty(ref.shape, dtype=kind.dtype)
        base = np.frombuffer(self._storage_bytes(ref.storage), dtype=kind.np_dtype)
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[ref.offset :], shape=ref.shape, strides=[s * item for s in ref.stride], writeable=False
        )
        arr = view.astype(view.dtype.newbyteorder("="), order="C", copy=True)
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if kind.dtype == torch.bfloat16 else t


def _check_zip(path: Path, zf: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    infos = zf.infolist()
    if not infos:
        raise PtFileError(path, "empty zip archive, not a torch file")
    if len(infos) > MAX_ENTRIES:
        raise PtFileError(path, f"zip archive has {len(infos)} entries: too many")
    size = path.stat().st_size
    for info in infos:
        if info.flag_bits & 0x1:
            raise PtFileError(path, f"encrypted zip entry {_show(info.filename)}")
        if info.compress_type != zipfile.ZIP_STORED:
            # torch.save never compresses; refusing compression rules out zip bombs
            raise PtFileError(path, f"compressed zip entry {_show(info.filename)} (torch files are stored)")
        if info.file_size != info.compress_size or info.header_offset + info.file_size > size:
            raise PtFileError(path, f"zip entry {_show(info.filename)} is truncated or corrupt")
    prefix = infos[0].filename.split("/", 1)[0]
    entries = {info.filename: info for info in infos}
    pkl = entries.get(f"{prefix}/data.pkl")
    if pkl is None:
        raise PtFileError(path, "zip archive without data.pkl: not a torch.save file")
    if pkl.file_size > MAX_PICKLE_BYTES:
        raise PtFileError(path, f"data.pkl is {pkl.file_size} bytes: too large")
    order = entries.get(f"{prefix}/byteorder")
    if order is not None:
        text = zf.read(order) if order.file_size <= 16 else b"?"
        if text != b"little":
            raise PtFileError(
                path, f"byte order {_show(text.decode('latin-1'))} is not supported (little only)"
            )
    return prefix, entries


def _refuse_non_zip(path: Path, head: bytes) -> None:
    if head[:4] == b"PK\x03\x04":
        return
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head[:16]:
        raise PtFileError(
            path, "old (non-zip) torch format: a raw pickle, never loaded; re-save it as .safetensors"
        )
    if head.startswith(b"\x80"):
        raise PtFileError(path, "a raw pickle file: pickle is never loaded (it can run code)")
    raise PtFileError(path, "not a torch.save zip file")


def open_pt(path: str | Path, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> PtArchive:
    """Open a ``torch.save`` file without unpickling: check the archive, interpret ``data.pkl``.

    Raises :class:`PtFileError` for anything refused or unreadable; nothing the file names is run."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise PtFileError(p, f"cannot read ({exc.strerror or exc})") from None
    _refuse_non_zip(p, head)
    try:
        zf = zipfile.ZipFile(p)
    except _ZIP_ERRORS as exc:
        raise PtFileError(
            p, f"not a readable zip archive, truncated or corrupt ({_show(str(exc))})"
        ) from None
    try:
        prefix, entries = _check_zip(p, zf)
        data = zf.read(entries[f"{prefix}/data.pkl"])
        obj = _Interpreter(p, entries, prefix, max_elements).run(data)
    except PtFileError:
        zf.close()
        raise
    except _ZIP_ERRORS as exc:
        zf.close()
        raise PtFileError(p, f"corrupt zip archive ({_show(str(exc))})") from None
    return PtArchive(p, zf, prefix, obj)


def _materialize(archive: PtArchive, obj: Any) -> Any:
    done: dict[int, Any] = {}
    active: set[int] = set()

    def walk(x: Any, depth: int) -> Any:
        if isinstance(x, TensorRef):
            return archive.tensor(x)
        if isinstance(x, _SCALARS):
            return x
        if not isinstance(x, dict | list | tuple):
            raise PtFileError(archive.path, f"refused: a {type(x).__name__} in the saved object")
        if id(x) in done:  # shared, possibly many times: converted once
            return done[id(x)]
        if id(x) in active or depth > MAX_NESTING:
            raise PtFileError(archive.path, "the saved object is recursive or nested too deeply")
        active.add(id(x))
        if isinstance(x, dict):
            out: Any = type(x)((k, walk(v, depth + 1)) for k, v in x.items())
        else:
            out = type(x)(walk(v, depth + 1) for v in x)
        active.discard(id(x))
        done[id(x)] = out
        return out

    return walk(obj, 0)


def load_pt(path: str | Path, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Any:
    """The object saved by ``torch.save``, with its tensors as CPU tensors; see :func:`open_pt`."""
    with open_pt(path, max_elements=max_elements) as archive:
        return _materialize(archive, archive.obj)


def load_pt_tensor(
    path: str | Path, keys: Iterable[str], *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> torch.Tensor:
    """The one tensor in a ``.pt`` file: the saved object itself, or the first of ``keys`` in a saved
    dict. Only that tensor's data is read."""
    keys = tuple(keys)
    with open_pt(path, max_elements=max_elements) as archive:
        obj = archive.obj
        if isinstance(obj, TensorRef):
            return archive.tensor(obj)
        if not isinstance(obj, dict):
            raise PtFileError(path, f"holds a {type(obj).__name__}, not a tensor or a dict of tensors")
        for key in keys:
            if key in obj:
                if not isinstance(obj[key], TensorRef):
                    raise PtFileError(path, f"{key!r} is a {type(obj[key]).__name__}, not a tensor")
                return archive.tensor(obj[key])
        found = ", ".join(_show(str(k)) for k in list(obj)[:10]) or "none"
        wanted = ", ".join(repr(k) for k in keys)
        raise PtFileError(path, f"no {wanted} tensor in the saved dict (found: {found})")
