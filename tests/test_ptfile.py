""".pt files read without unpickling: real torch.save files round-trip, hostile ones are refused."""

from __future__ import annotations

import io
import os
import pickle
import random
import subprocess
import time
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib_vaebatch.latents import LatentFileError, read_latents
from lib_vaebatch.ptfile import PtFileError, load_pt, load_pt_tensor, open_pt

_FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _save(obj: Any, path: Path, **kwargs: Any) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def _entries(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _write_zip(path: Path, entries: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _replace(entries: dict[str, bytes], suffix: str, data: bytes) -> dict[str, bytes]:
    return {k: (data if k.endswith(suffix) else v) for k, v in entries.items()}


# ---- files written by torch.save -------------------------------------------------------------------


def test_tensor_dicts_and_dtypes_round_trip(tmp_path):
    z = torch.randn(2, 4, 8, 6)
    cases: list[Any] = [
        z,
        {"latents": z},
        OrderedDict(samples=z, note="x"),
        {"latent_tensor": z.half()},
        {"latents": z.bfloat16()},
        {"latents": z.double(), "steps": 20, "cfg": 7.5, "ok": True, "none": None, "l": [1, "a", (2, 3)]},
        torch.nn.Parameter(z),
        {"latents": torch.arange(12, dtype=torch.int64).reshape(1, 3, 2, 2)},
    ]
    for i, obj in enumerate(cases):
        back = load_pt(_save(obj, tmp_path / f"{i}.pt"))
        if isinstance(obj, torch.Tensor):
            assert type(back) is torch.Tensor and back.dtype == obj.dtype and torch.equal(back, obj.detach())
            continue
        assert type(back) is type(obj) and list(back) == list(obj)
        for key, value in obj.items():
            if isinstance(value, torch.Tensor):
                assert back[key].dtype == value.dtype and torch.equal(back[key], value)
            else:
                assert back[key] == value


def test_views_offsets_and_shared_storage(tmp_path):
    base = torch.randn(3, 4, 8, 8)
    views = {
        "strided": base[:, :, ::2],
        "offset": base[1:],
        "transposed": base.transpose(2, 3),
        "expanded": base[:1, :1].expand(2, 4, 8, 8),
        "half_offset": base.half()[2:, 1:3],
        "bf16_view": base.bfloat16()[:, :, 1::3, ::2],
        "empty": base[:0],
    }
    back = load_pt(_save(views, tmp_path / "v.pt"))
    for key, value in views.items():
        assert back[key].is_contiguous() and back[key].dtype == value.dtype
        assert torch.equal(back[key], value), key
    # the same storage, saved once, read into tensors that do not share memory
    assert len([k for k in _entries(tmp_path / "v.pt") if "/data/" in k]) == 3
    back["offset"].zero_()
    assert torch.equal(back["strided"], base[:, :, ::2])


def test_pickle_protocol_4_and_a_lazy_archive(tmp_path):
    z = torch.randn(1, 4, 4, 4)
    path = _save({"latents": z, "other": torch.zeros(1000)}, tmp_path / "p4.pt", pickle_protocol=4)
    assert torch.equal(load_pt_tensor(path, ["latents"]), z)
    with open_pt(path) as archive:  # nothing read until asked
        assert archive.obj["latents"].shape == (1, 4, 4, 4) and archive.obj["latents"].dtype == torch.float32


def test_read_latents_takes_pt_files(tmp_path):
    z = torch.randn(2, 16, 8, 8)
    for i, obj in enumerate([z, {"latents": z}, {"samples": z.half()}, OrderedDict(latent_tensor=z)]):
        for suffix in (".pt", ".pth"):
            batch = read_latents(_save(obj, tmp_path / f"{i}{suffix}"))
            assert batch.kind == "pt" and batch.scaled and batch.family is None
            assert batch.latents.dtype == torch.float32 and batch.resolve_family().name == "flux"
            assert torch.equal(batch.latents, z.half().float() if i == 2 else z)
    single = read_latents(_save(torch.randn(4, 8, 8).bfloat16(), tmp_path / "one.pt"))
    assert single.latents.shape == (1, 4, 8, 8) and single.resolve_family().name == "sd1"


@pytest.mark.parametrize(
    ("obj", "problem"),
    [
        ({"a": torch.zeros(1, 4, 2, 2), "b": 1}, r"no 'latents', 'samples', 'latent_tensor' .*found: a, b"),
        ({"latents": [1, 2]}, "'latents' is a list, not a tensor"),
        ([torch.zeros(1, 4, 2, 2)], "holds a list"),
        (torch.zeros(1, 4, 2, 2, dtype=torch.int32), "floating point"),
        (torch.zeros(4, 2), r"\[batch, channels, height, width\]"),
    ],
)
def test_pt_latents_that_are_not_usable(tmp_path, obj, problem):
    path = _save(obj, tmp_path / "bad.pt")
    with pytest.raises(LatentFileError, match=problem) as info:
        read_latents(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pkl"])
def test_other_pickle_suffixes_stay_refused(tmp_path, suffix):
    path = _save({"latents": torch.zeros(1, 4, 2, 2)}, tmp_path / f"x{suffix}")
    with pytest.raises(LatentFileError, match="never loaded"):
        read_latents(path)


# ---- hostile files ---------------------------------------------------------------------------------


class _Evil:
    """Pickles as a call of ``func(*args)``: what a malicious .pt file carries."""

    def __init__(self, func: Any, args: tuple[Any, ...]) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def _evil_cases(marker: Path) -> list[tuple[Any, tuple[Any, ...]]]:
    return [
        (os.system, (f"touch {marker}",)),
        (eval, (f"open({str(marker)!r}, 'w')",)),
        (subprocess.call, (["touch", str(marker)],)),
        (exec, (f"open({str(marker)!r}, 'w')",)),
    ]


@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("protocol", [2, 4])
def test_code_in_the_pickle_is_refused_not_run(tmp_path, case, protocol):
    marker = tmp_path / "pwned"
    func, args = _evil_cases(marker)[case]
    name = f"{func.__module__}.{func.__name__}"  # posix.system, builtins.eval, subprocess.call
    # a hand-made pickle inside a valid torch zip, and torch.save of a dict that also holds real latents
    good = _entries(_save(torch.zeros(1, 4, 2, 2), tmp_path / "good.pt"))
    crafted = _write_zip(
        tmp_path / "crafted.pt",
        _replace(good, "data.pkl", pickle.dumps(_Evil(func, args), protocol=protocol)),
    )
    mixed = _save({"latents": torch.zeros(1, 4, 2, 2), "x": _Evil(func, args)}, tmp_path / "mixed.pt")
    for path in (crafted, mixed):
        with pytest.raises(PtFileError, match=f"refused: the pickle references {name}"):
            load_pt(path)
        with pytest.raises(LatentFileError, match=f"refused: the pickle references {name}"):
            read_latents(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("pkl", "problem"),
    [
        (pickle.dumps({1, 2}, protocol=2), "references builtins.set"),
        (pickle.dumps(OrderedDict(a=1), protocol=2), None),  # allowed: OrderedDict
        (pickle.dumps(torch.float32, protocol=2), "references torch.float32"),
        (b"\x80\x02ctorch\nFloatStorage\n)R.", "REDUCE on FloatStorage"),
        (b"\x80\x02(I1\nl.", "opcode INT is not allowed"),
        (b"\x80\x02}}K\x01s.", "dict key of type dict"),
        (b"\x80\x02](K\x01.", "corrupt data.pkl"),
        (b"\x80\x02" + b"(" * 100 + b"t" * 100 + b".", "nested too deeply"),
        (b"\x80\x02]q\x00h\x00a.", "recursive"),
        (b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x02\x00\x00\x00..X\x00\x00\x00\x00K\x00tQ.",
         "refused: storage key"),
    ],
)  # fmt: skip
def test_pickles_outside_the_whitelist(tmp_path, pkl, problem):
    good = _entries(_save(torch.zeros(1), tmp_path / "good.pt"))
    path = _write_zip(tmp_path / "x.pt", _replace(good, "data.pkl", pkl))
    if problem is None:
        assert load_pt(path) == OrderedDict(a=1)
        return
    with pytest.raises(PtFileError, match=problem) as info:
        load_pt(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


class _Storage:
    def __init__(self, key: str, numel: int, kind: Any = torch.FloatStorage) -> None:
        self.key, self.numel, self.kind = key, numel, kind


class _Tensor:
    """Pickles like a tensor with any storage, offset, shape and stride we declare."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        args = (self.storage, self.offset, self.shape, self.stride, False, OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


def _craft(path: Path, obj: Any, data: dict[str, bytes], byteorder: bytes = b"little") -> Path:
    class P(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            return ("storage", o.kind, o.key, "cpu", o.numel) if isinstance(o, _Storage) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj)
    entries = {"archive/data.pkl": buf.getvalue(), "archive/byteorder": byteorder, "archive/version": b"3\n"}
    entries |= {f"archive/data/{k}": v for k, v in data.items()}
    return _write_zip(path, entries)


def test_the_crafting_helper_makes_real_torch_files(tmp_path):
    path = _craft(tmp_path / "ok.pt", _Tensor(_Storage("0", 4), 1, (1, 3), (3, 1)), {"0": bytes(16)})
    # our own file, known content: torch's restricted loader confirms the helper writes torch's format
    assert torch.equal(torch.load(path, weights_only=True), torch.zeros(1, 3))
    assert torch.equal(load_pt(path), torch.zeros(1, 3))


def test_huge_declarations_are_refused_before_allocating(tmp_path):
    shape = (1 << 20, 4, 1 << 10, 1 << 10)
    stride = (1 << 22, 1 << 20, 1 << 10, 1)
    huge = _craft(tmp_path / "huge.pt", _Tensor(_Storage("0", 1 << 42), 0, shape, stride), {"0": bytes(16)})
    # under the element cap, but the data entry does not hold it: refused from the zip directory
    big = _craft(tmp_path / "big.pt", _Tensor(_Storage("0", 1 << 30), 0, (1 << 30,), (1,)), {"0": bytes(16)})
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(PtFileError, match="too large"):
        load_pt(huge)
    with pytest.raises(LatentFileError, match="too large"):
        read_latents(huge)
    with pytest.raises(PtFileError, match=r"holds 16 bytes, expected 1073741824 × 4"):
        load_pt(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - start < 2 and peak < 16 << 20


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: _craft(p, _Tensor(_Storage("0", 4), 0, (2, 3), (3, 1)), {"0": bytes(16)}), "outside"),
        (lambda p: _craft(p, _Tensor(_Storage("0", 4), 5, (0,), (1,)), {"0": bytes(16)}), "outside"),
        (lambda p: _craft(p, _Tensor(_Storage("0", 4), 0, (2,), (-1,)), {"0": bytes(16)}), "bad shape"),
        (lambda p: _craft(p, _Tensor(_Storage("0", 4), 0, (4,), (1,)), {"0": bytes(12)}), "holds 12 bytes"),
        (lambda p: _craft(p, _Tensor(_Storage("1", 4), 0, (4,), (1,)), {"0": bytes(16)}), "no data entry"),
        (
            lambda p: _craft(p, _Tensor(_Storage("0", 4), 0, (4,), (1,)), {"0": bytes(16)}, b"big"),
            "byte order big is not supported",
        ),
        (
            lambda p: _craft(
                p,
                [_Tensor(_Storage("0", 4), 0, (4,), (1,)), _Tensor(_Storage("0", 2), 0, (2,), (1,))],
                {"0": bytes(16)},
            ),
            "declared twice",
        ),
        (
            lambda p: _craft(p, _Tensor(_Storage("0", 4, torch.ComplexFloatStorage), 0, (4,), (1,)), {}),
            "references torch.ComplexFloatStorage",
        ),
    ],
)
def test_inconsistent_tensor_declarations(tmp_path, make, problem):
    path = make(tmp_path / "t.pt")
    with pytest.raises(PtFileError, match=problem):
        load_pt(path)


def test_damaged_and_foreign_files(tmp_path):
    z = torch.randn(1, 4, 8, 8)
    good_path = _save({"latents": z}, tmp_path / "good.pt")
    good = good_path.read_bytes()
    entries = _entries(good_path)
    short = {k: (v[:-4] if "/data/" in k else v) for k, v in entries.items()}
    cases = {
        "truncated_half.pt": (good[: len(good) // 2], "not a readable zip archive"),
        "truncated_tail.pt": (good[:-10], "not a readable zip archive"),
        # Seeded noise that starts with neither a zip nor a pickle protocol header
        # (unseeded noise starts with 0x80 one time in 256 and is then a "raw pickle").
        "random.pt": (b"\x00" + random.Random(7).randbytes(4095), "not a torch.save zip file"),
        "random_pickle_header.pt": (
            b"\x80" + random.Random(8).randbytes(4095),
            "raw pickle file: pickle is never loaded",
        ),
        "empty.pt": (b"", "not a torch.save zip file"),
        "raw_pickle.pt": (pickle.dumps({"latents": 1}), "raw pickle file: pickle is never loaded"),
        "short_entry.pt": (
            _write_zip(tmp_path / "s.zip", short).read_bytes(),
            "holds 1020 bytes, expected 256 × 4",
        ),
        "deflated.pt": (
            _write_zip(tmp_path / "d.zip", entries, zipfile.ZIP_DEFLATED).read_bytes(),
            "compressed zip entry",
        ),
        "no_pkl.pt": (_write_zip(tmp_path / "n.zip", {"a/x": b"1"}).read_bytes(), "without data.pkl"),
    }
    flipped = bytearray(good)
    flipped[good.index(z.numpy().tobytes()) + 100] ^= 0xFF
    cases["bad_crc.pt"] = (bytes(flipped), "unreadable data entry '0'")
    for name, (data, problem) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(PtFileError, match=problem):
            load_pt(path)
    legacy = _save(torch.zeros(1, 4, 2, 2), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(LatentFileError, match=r"old \(non-zip\) torch format.*re-save it as .safetensors"):
        read_latents(legacy)


# ---- fuzzing: whatever the bytes, only our error comes out -----------------------------------------


def _valid_pt() -> tuple[bytes, dict[str, bytes]]:
    buf = io.BytesIO()
    z = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)
    obj = OrderedDict(latents=z[:, :, 1:], n=3, f=0.5, s="x", t=(True, None), h=z.half())
    torch.save(obj, buf)
    data = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return data, {i.filename: zf.read(i) for i in zf.infolist()}


_VALID, _VALID_ENTRIES = _valid_pt()
_PKL = next(v for k, v in _VALID_ENTRIES.items() if k.endswith("data.pkl"))


def _load_or_our_error(path: Path) -> None:
    """Loads, or raises PtFileError with a one-line message; any other exception fails the test."""
    try:
        load_pt(path)
    except PtFileError as exc:
        message = str(exc)
    else:
        return
    assert "\n" not in message


@settings(_FUZZ, max_examples=200)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_files_only_raise_our_error(tmp_path, edits):
    data = bytearray(_VALID)
    for at, value in edits:
        data[at] = value
    path = tmp_path / "m.pt"
    path.write_bytes(bytes(data))
    _load_or_our_error(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pickletools")  # genops decoding junk strings
@_FUZZ
@given(
    st.one_of(
        st.lists(st.tuples(st.integers(0, len(_PKL) - 1), st.integers(0, 255)), min_size=1, max_size=6),
        st.binary(max_size=200).map(lambda b: [(-1, b)]),
    )
)
def test_mutated_pickles_in_a_valid_zip_only_raise_our_error(tmp_path, edits):
    pkl = bytearray(_PKL)
    for at, value in edits:
        if at == -1:  # whole random pickle, after a protocol header
            pkl = bytearray(b"\x80\x02" + value)
        else:
            pkl[at] = value
    path = _write_zip(tmp_path / "m.pt", _replace(_VALID_ENTRIES, "data.pkl", bytes(pkl)))
    _load_or_our_error(path)
