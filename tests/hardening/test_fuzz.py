"""Property-based fuzzing of every parser that takes outside input: the latents-file loader, the
image metadata reader, file naming end to end, and the HTTP API's payload parsers.

Each property is "only the documented error, never another exception". Examples per test are
kept small for the suite (``VAEBATCH_FUZZ_EXAMPLES`` raises them for a long offline run)."""

from __future__ import annotations

import io
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save as st_save

from lib_vaebatch.api import service
from lib_vaebatch.api.service import ApiError
from lib_vaebatch.backends import ApproxVAE
from lib_vaebatch.families import get_family
from lib_vaebatch.jobs import decode_to_folder
from lib_vaebatch.latents import LatentBatch, LatentFileError, read_latents
from lib_vaebatch.saving import encode_image, read_info, read_infotext
from lib_vaebatch.ui.actions import Reporter
from lib_vaebatch.ui.standalone import StandaloneHost

EXAMPLES = int(os.environ.get("VAEBATCH_FUZZ_EXAMPLES", "0"))


def fuzz(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# -- mutations ----------------------------------------------------------------------------------
_EDIT = st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "delete"]), st.integers(0, 1 << 16),
                  st.integers(0, 255))  # fmt: skip


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in edits:
        if not buf:
            break
        i = pos % len(buf)
        if kind == "flip":
            buf[i] ^= 1 << (value % 8)
        elif kind == "set":
            buf[i] = value
        elif kind == "cut":
            del buf[i:]
        elif kind == "insert":
            buf[i:i] = bytes([value]) * (1 + value % 7)
        else:
            del buf[i : i + 1 + value % 16]
    return bytes(buf)


# -- the latents-file loader --------------------------------------------------------------------
_META = {"format": "vaebatch/1", "family": "sd1", "scaled": "true", "scaling_factor": "0.18215",
         "sources": '["a.png", "b.png"]', "sizes": "[[64, 64], [64, 64]]",
         "parameters": '["a cat\\nSteps: 20, Seed: 1, Size: 64x64", "b"]'}  # fmt: skip
VALID_FILES = {
    "ours": st_save({"latents": torch.randn(2, 4, 3, 3)}, metadata=_META),
    "half": st_save({"latents": torch.randn(2, 4, 2, 2).half()}),
    "comfy": st_save({"latent_tensor": torch.randn(1, 4, 2, 2), "latent_format_version_0": torch.tensor([])}),
}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


VALID_NPY = _npy(np.zeros((1, 4, 2, 2), np.float32))


def _read(data: bytes, suffix: str = ".safetensors") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"f{suffix}"
        path.write_bytes(data)
        try:
            read_latents(path)
        except LatentFileError as exc:
            error = exc
        else:
            return
        assert str(error).startswith(str(path)) and "\n" not in error.problem


@fuzz(120)
@given(st.sampled_from(sorted(VALID_FILES)), st.lists(_EDIT, min_size=1, max_size=6))
def test_mutated_safetensors_only_raise_latent_file_error(name, edits):
    _read(mutate(VALID_FILES[name], edits))


@fuzz(60)
@given(st.lists(_EDIT, min_size=1, max_size=6))
def test_mutated_npy_only_raise_latent_file_error(edits):
    _read(mutate(VALID_NPY, edits), ".npy")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_DIM = st.one_of(st.integers(0, 6), st.integers(0, 2**70), st.just(-1), st.booleans(), st.floats())
_ST_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "X"])
_OFFSET = st.one_of(st.integers(0, 80), st.integers(-5, 2**70))
_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(_ST_DTYPES, _JSON),
        "shape": st.one_of(st.lists(_DIM, max_size=6), _JSON),
        "data_offsets": st.one_of(st.lists(_OFFSET, max_size=3), _JSON),
    },
)
_HEADER = st.dictionaries(
    st.sampled_from(["latents", "latent_tensor", "latent_format_version_0", "__metadata__", "x"]),
    st.one_of(_ENTRY, _JSON, st.dictionaries(st.text(max_size=6), st.text(max_size=20), max_size=3)),
    max_size=3,
)


@fuzz(150)
@given(_HEADER, st.binary(max_size=96), st.integers(-3, 3))
def test_random_headers_only_raise_latent_file_error(header, data, length_skew):
    raw = json.dumps(header).encode()
    length = max(0, len(raw) + length_skew)
    _read(struct.pack("<Q", length) + raw + data)


# -- the metadata reader --------------------------------------------------------------------------
_TEXT = "a fox, 狐\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 16x16"
VALID_IMAGES = {fmt: encode_image(Image.new("RGB", (16, 16), (9, 99, 199)), fmt, _TEXT)
                for fmt in ("png", "jpg", "webp")}  # fmt: skip
#: What the reader may raise for a file that is not a readable image: PIL's UnidentifiedImageError
#: (an OSError) and ValueError. Everything else is a bug.
READ_ERRORS = (OSError, ValueError)


@fuzz(150)
@given(st.sampled_from(sorted(VALID_IMAGES)), st.lists(_EDIT, min_size=1, max_size=6))
def test_mutated_images_only_raise_documented_errors_in_read_info(fmt, edits):
    data = mutate(VALID_IMAGES[fmt], edits)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"x.{fmt}"
        path.write_bytes(data)
        try:
            text, items = read_info(path)
        except READ_ERRORS:
            return
        assert text is None or isinstance(text, str)
        assert isinstance(items, dict)
        assert read_infotext(path) == text


# -- file names, end to end -----------------------------------------------------------------------
_TOKEN = st.sampled_from([
    "[prompt]", "[prompt_spaces]", "[prompt_words]", "[seed]", "[datetime<%Y/%m/..>]",
    "[hasprompt<a|../b>]", "[stem]", "[source]", "[none]", "[model_name]",
])  # fmt: skip
_SEPARATORS = st.sampled_from(["../", "..", "/", "\\", "\x00"])
_PATTERN = st.lists(st.one_of(st.text(max_size=12), _TOKEN, _SEPARATORS), max_size=6).map("".join)
_HOSTILE = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["../../../etc/passwd", "/abs/path", "..", ".", "a\x00b", "C:\\x\\..\\y", "x" * 600]),
)


@fuzz(30)
@given(_PATTERN, _HOSTILE, _HOSTILE)
def test_decoding_with_any_pattern_and_prompt_saves_inside_the_folder(pattern, prompt, source):
    """The whole save path (infotext from the file, tokens, pattern, namer): every image lands
    directly in the output folder and nothing else is created."""
    backend = ApproxVAE(get_family("sd1"))
    params = f"{prompt}\nSteps: 20, Seed: 3, Model: {prompt[:40]!r}"
    batch = LatentBatch(torch.zeros(1, 4, 2, 2), parameters=[params], sources=[source])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = root / "out"
        job = decode_to_folder([batch], out, lambda _f: backend, pattern=pattern, writers=0)
        assert job.ok, job.save_errors
        assert os.listdir(root) == ["out"]
        names = os.listdir(out)
        assert len(names) == 1 and names[0].endswith(".png") and names[0][:5].isdigit()
        assert [s.path for s in job.saved] == [out / names[0]]


# -- the API's payload parsers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> StandaloneHost:
    return StandaloneHost(output_dir=tmp_path_factory.mktemp("api-fuzz"), device="cpu")


_B64 = st.one_of(st.text(max_size=20), st.sampled_from(["", "AAAA", "data:x", "data:,AAAA", "@@"]))
_DECODE_VALUES = {
    "latents": st.one_of(_B64, _JSON),
    "tensor": st.one_of(_B64, st.just("AAAAAAAAAAAAAAAAAAAAAA=="), _JSON),
    "shape": st.one_of(st.lists(_DIM, max_size=6), _JSON),
    "dtype": st.one_of(st.sampled_from(["float16", "bfloat16", "float32", "int8", ""]), _JSON),
    "scaled": _JSON,
    "family": st.one_of(st.sampled_from(["sd1", "flux", "nope"]), _JSON),
    "options": st.one_of(
        st.dictionaries(
            st.sampled_from(
                [
                    "max_chunk",
                    "ladder",
                    "offload",
                    "memory_budget",
                    "memory_fraction",
                    "tiling",
                    "tile_size",
                    "nan_check",
                    "chunk_mode",
                    "bogus",
                ]
            ),
            _JSON,
            max_size=3,
        ),
        _JSON,
    ),
    "save": _JSON,
    "vae": _JSON,
    "format": st.one_of(st.sampled_from(["png", "JPG", "gif"]), _JSON),
}
_PAYLOAD = st.one_of(
    _JSON,
    st.fixed_dictionaries({}, optional=_DECODE_VALUES),
    st.fixed_dictionaries({}, optional={**_DECODE_VALUES, "zzz": _JSON}),
)


def check_api_error(exc: ApiError) -> None:
    body = exc.body()
    assert 400 <= exc.status < 500 and isinstance(body["error"], str) and body["error"]
    json.dumps(body)  # the answer is always serialisable


@fuzz(300)
@given(_PAYLOAD)
def test_decode_payloads_only_raise_api_error(payload):
    try:
        service.parse_decode(payload)
    except ApiError as exc:
        check_api_error(exc)


_PNG_B64 = __import__("base64").b64encode(VALID_IMAGES["png"]).decode()
_ENCODE_PAYLOAD = st.one_of(
    _JSON,
    st.fixed_dictionaries(
        {},
        optional={
            "images": st.one_of(st.lists(st.one_of(_B64, st.just(_PNG_B64), _JSON), max_size=3), _JSON),
            "parameters": st.one_of(st.lists(st.text(max_size=10), max_size=3), _JSON),
            "fit": st.one_of(st.sampled_from(["crop", "resize", "zoom"]), _JSON),
            "alpha": st.one_of(st.sampled_from(["composite", "drop"]), _JSON),
            "background": st.one_of(st.sampled_from(["#fff", "red", "nope", "#12"]), _JSON),
            "sample": _JSON,
            "seed": st.one_of(st.integers(), _JSON),
            "options": _DECODE_VALUES["options"],
            "vae": _JSON,
        },
    ),
)


@fuzz(200)
@given(_ENCODE_PAYLOAD)
def test_encode_payloads_only_raise_api_error(host, payload):
    try:
        answer = service.encode(host, payload, Reporter())
    except ApiError as exc:
        check_api_error(exc)
    else:
        assert answer["shape"][1:] == [4, 2, 2] and answer["results"]
