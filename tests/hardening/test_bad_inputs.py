"""A corpus of bad input for every surface: latents files, images, file-name patterns, infotext
(through the UI actions, as an upload would arrive) and the HTTP API (against a real server).

Each case is one kind of bad input with the clear answer it must get: a one-line error naming the
problem (a :class:`UserError`, a :class:`LatentFileError`, a 4xx JSON answer), or, for inputs that
are merely unusual (alpha, odd sizes, 16-bit, CMYK...), a result. Where work was already done, it is
kept; nothing is ever written outside the output folder."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import pickle
import re
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

from lib_vaebatch import infotext
from lib_vaebatch.latents import LatentFileError, read_latents
from lib_vaebatch.saving import exif_user_comment, read_info, read_infotext
from lib_vaebatch.ui.actions import DecodeRequest, EncodeRequest, Reporter, UserError, decode, encode
from lib_vaebatch.ui.standalone import StandaloneHost
from tests.hardening.conftest import call, post_large, rss_bytes, url

MiB = 1 << 20


# -- makers -------------------------------------------------------------------------------------
def st_file(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    return st_save(tensors, metadata=meta)


def raw_st(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head) if length is None else length) + head + data


def latents(*shape: int, fill: float = 0.1, dtype: torch.dtype = torch.float32) -> bytes:
    return st_file({"latents": torch.full(shape, fill, dtype=dtype)})


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


class Evil:
    """Pickles as ``os.system(command)``: what a hostile ``.pt``/``.pkl`` carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (self.command,)


def evil_pt(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"latents": torch.zeros(1, 4, 2, 2), "x": Evil(f"touch {marker}")}, buf)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def webp_declaring(width: int, height: int) -> bytes:
    """A WebP header (VP8X) declaring a ``width`` x ``height`` canvas, and nothing else."""
    vp8x = b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg_with_exif_count(count: int) -> bytes:
    """A JPEG whose EXIF UserComment entry claims ``count`` bytes (damaged metadata)."""
    exif = bytearray(exif_user_comment("a cat"))
    for tag in (b"\x92\x86\x00\x07", b"\x86\x92\x07\x00"):  # big- or little-endian entry
        at = exif.find(tag)
        if at >= 0:
            order = ">" if tag[0] == 0x92 else "<"
            exif[at + 4 : at + 8] = struct.pack(order + "I", count)
            break
    else:
        raise AssertionError("no UserComment entry")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG", exif=bytes(exif))
    return buf.getvalue()


def image_bytes(
    size: tuple[int, int] = (64, 64), mode: str = "RGB", fmt: str = "PNG", noise: bool = False
) -> bytes:
    if noise:
        rng = np.random.default_rng(0)
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    elif mode == "I;16":
        img = Image.fromarray(np.full((size[1], size[0]), 40000, dtype=np.uint16), "I;16")
    else:
        img = Image.new(mode, size)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def unescape(log_html: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "\n", log_html))


# -- a UI environment -----------------------------------------------------------------------------
@dataclass
class Env:
    root: Path
    host: StandaloneHost = field(init=False)

    def __post_init__(self) -> None:
        (self.root / "in").mkdir()
        self.host = StandaloneHost(output_dir=self.root / "out", device="cpu")

    @property
    def out(self) -> Path:
        return self.root / "out"

    def put(self, name: str, data: bytes) -> Path:
        path = self.root / "in" / name
        path.write_bytes(data)
        return path

    def outputs(self) -> list[Path]:
        return sorted(p for p in self.out.rglob("*") if p.is_file())

    def assert_contained(self) -> None:
        """Nothing but the inputs and the output folder in the root; outputs one level deep."""
        assert sorted(os.listdir(self.root)) in (["in"], ["in", "out"])
        for p in self.outputs():
            assert p.parent.parent == self.out and p.parent.name in ("images", "latents"), p


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


GOOD_LATENTS = st_file({"latents": torch.full((2, 4, 8, 8), 0.1)})


# -- latents files ---------------------------------------------------------------------------------
@dataclass
class FileCase:
    id: str
    suffix: str
    make: Callable[[Path], bytes]
    problem: str  # regex the one-line error must match
    reader_accepts: bool = False  # read_latents takes it; the decode's checks refuse it


HUGE = [100_000, 4, 100_000, 100_000]
NO_FAMILY_CHANNELS = (1, 3, 6, 8, 32)  # latent channel counts no model family has (they have 4 or 16)


def no_family(channels: int) -> str:
    return rf"latents have {channels} channels?; no model family has {channels} \(known: 4 or 16\)"


def entry(shape: list[int], offsets: list[int]) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


FILE_CASES = [
    FileCase("truncated-safetensors", ".safetensors", lambda _: GOOD_LATENTS[:-100],
             r"declares shape \[2, 4, 8, 8\] \(2048 bytes\) but the file holds 1948 bytes"),
    FileCase("corrupt-header-not-json", ".safetensors", lambda _: raw_st(b"{not json"),
             r"corrupt safetensors header \(not JSON\)"),
    FileCase("header-length-overflow", ".safetensors", lambda _: raw_st(b"{}", length=2**64 - 1),
             r"corrupt safetensors header \(declares 18446744073709551615 header bytes\)"),
    FileCase("header-deeply-nested", ".safetensors", lambda _: raw_st(b"[" * 100_000 + b"]" * 100_000),
             r"corrupt safetensors header \(not JSON\)"),
    FileCase("huge-declared-shape", ".safetensors",
             lambda _: raw_st({"latents": entry(HUGE, [0, 16])}, b"\0" * 16),
             r"declares shape \[100000, 4, 100000, 100000\]"),
    FileCase("zero-dim-with-absurd-dim", ".safetensors",
             lambda _: raw_st({"latents": entry([0, 10**30, 1, 1], [0, 0])}),
             r"not a readable safetensors file|corrupt"),
    FileCase("int-dtype", ".safetensors", lambda _: latents(1, 4, 8, 8, dtype=torch.int32),
             r"latents must be floating point, got I32"),
    FileCase("3d-tensor", ".safetensors", lambda _: st_file({"latents": torch.zeros(4, 8, 8)}),
             r"latents must be \[batch, channels, height, width\], got shape \[4, 8, 8\]"),
    FileCase("5d-video-tensor", ".safetensors", lambda _: st_file({"latents": torch.zeros(1, 4, 2, 8, 8)}),
             r"5-D \(video\) latents \[1, 4, 2, 8, 8\] are not supported"),
    FileCase("empty-batch", ".safetensors", lambda _: latents(0, 4, 8, 8), r"the file holds no samples"),
    FileCase("no-latents-tensor", ".safetensors",
             lambda _: st_file({"a": torch.zeros(1), "b": torch.zeros(1)}),
             r"no 'latents' tensor \(found: a, b\)"),
    FileCase("bad-metadata", ".safetensors",
             lambda _: st_file({"latents": torch.zeros(1, 4, 8, 8)}, {"sizes": "[[1]]"}),
             r"metadata 'sizes' must be a list of \[width, height\] pairs"),
    FileCase("family-channel-mismatch", ".safetensors",
             lambda _: st_file({"latents": torch.zeros(1, 4, 8, 8)}, {"family": "flux"}),
             r"family flux has 16 channels, latents have 4"),
    *(FileCase(f"{c}-channels-no-family-has", ".safetensors", lambda _, c=c: latents(1, c, 8, 8),
               no_family(c), reader_accepts=True) for c in NO_FAMILY_CHANNELS),
    FileCase("nan-latents", ".safetensors", lambda _: latents(1, 4, 8, 8, fill=float("nan")),
             r"sample 0: latents contain NaN \(256 NaN, 0 Inf values\)", reader_accepts=True),
    FileCase("inf-latents", ".safetensors", lambda _: latents(1, 4, 8, 8, fill=float("inf")),
             r"sample 0: latents contain Inf \(0 NaN, 256 Inf values\)", reader_accepts=True),
    FileCase("zero-byte-file", ".safetensors", lambda _: b"", r"truncated \(no safetensors header\)"),
    FileCase("pt-with-os-system", ".pt", evil_pt,
             r"refused: the pickle references posix\.system \(only tensors are loaded\)"),
    FileCase("pkl", ".pkl", lambda m: pickle.dumps(Evil(f"touch {m}")),
             r"pickle-based files are never loaded \(they can run code\)"),
    FileCase("ckpt", ".ckpt", lambda m: pickle.dumps(Evil(f"touch {m}")),
             r"pickle-based files are never loaded \(they can run code\)"),
    FileCase("npy-object-array", ".npy", lambda _: npy(np.array([Evil("true")], dtype=object), True),
             r"object arrays \(pickle\) are never loaded"),
    FileCase("npy-damaged-header", ".npy", lambda _: npy(np.zeros((1, 4, 2, 2), np.float32))[:20] + b"(" * 40,
             r"not a readable \.npy file"),
    FileCase("unknown-suffix", ".png", lambda _: image_bytes(), r"unknown latents file type \.png"),
]  # fmt: skip


@pytest.mark.parametrize("case", FILE_CASES, ids=[c.id for c in FILE_CASES])
def test_bad_latents_files(env: Env, case: FileCase) -> None:
    marker = env.root / "pwned"
    good = env.put("good.safetensors", GOOD_LATENTS)
    bad = env.put(f"bad{case.suffix}", case.make(marker))
    read_latents(good)  # warm up, so the reading below starts from a steady RSS
    before = rss_bytes()
    if case.reader_accepts:
        read_latents(bad)
    else:
        with pytest.raises(LatentFileError) as info:
            read_latents(bad)
        assert re.search(case.problem, str(info.value)) and str(info.value).startswith(str(bad))
    assert rss_bytes() - before < 64 * MiB  # refused before allocating what the file declares

    # The upload next to a good file: the good one is decoded and saved, the bad one reported.
    outcome = decode(env.host, DecodeRequest(uploads=[str(good), str(bad)]), Reporter())
    log = unescape(outcome.log_html)
    assert re.search(case.problem, log), log
    assert not outcome.ok and len(outcome.images) == 2 and len(env.outputs()) == 2
    # Alone, it is a one-line UserError.
    with pytest.raises(UserError, match=case.problem):
        decode(env.host, DecodeRequest(uploads=[str(bad)]), Reporter())
    assert not marker.exists()
    env.assert_contained()


# -- images --------------------------------------------------------------------------------------
@dataclass
class ImageCase:
    id: str
    images: Callable[[], list[bytes]]
    problem: str | None = None  # None: it works
    shapes: list[list[int]] | None = None  # latents shapes it gives (UI: one file per size)
    api_problem: str | None = None  # where the API differs (one request = one size)
    request: dict[str, Any] = field(default_factory=dict)


IMAGE_CASES = [
    ImageCase("decompression-bomb-100k", lambda: [png_declaring(100_000, 100_000)],
              r"refused as a decompression bomb"),
    ImageCase("over-the-pixel-limit", lambda: [png_declaring(9000, 8000)],
              r"9000x8000 is larger than the 67108864-pixel limit"),
    ImageCase("webp-declaring-huge-canvas", lambda: [webp_declaring(1 << 24, 1 << 24)],
              r"16777216x16777216 is larger than the 67108864-pixel limit"),
    ImageCase("damaged-exif-count", lambda: [jpeg_with_exif_count(0xFFFFFFF0)], shapes=[[1, 4, 2, 2]]),
    ImageCase("truncated-png", lambda: [image_bytes(noise=True)[:2000]], r"corrupt or truncated image"),
    ImageCase("truncated-jpeg", lambda: [image_bytes(fmt="JPEG", noise=True)[:1500]],
              r"corrupt or truncated image"),
    ImageCase("zero-byte-image", lambda: [b""], r"not an image file PIL can read"),
    ImageCase("not-an-image", lambda: [GOOD_LATENTS], r"not an image file PIL can read"),
    ImageCase("1x1-image", lambda: [image_bytes((1, 1))], r"1x1 is smaller than the 8x8 minimum"),
    ImageCase("16-bit-png", lambda: [image_bytes(mode="I;16")], shapes=[[1, 4, 8, 8]]),
    ImageCase("palette-png", lambda: [image_bytes(mode="P")], shapes=[[1, 4, 8, 8]]),
    ImageCase("cmyk-jpeg", lambda: [image_bytes(mode="CMYK", fmt="JPEG")], shapes=[[1, 4, 8, 8]]),
    ImageCase("la-alpha", lambda: [image_bytes(mode="LA")], shapes=[[1, 4, 8, 8]]),
    ImageCase("rgba-alpha-dropped", lambda: [image_bytes(mode="RGBA")], shapes=[[1, 4, 8, 8]],
              request={"alpha": "drop"}),
    ImageCase("size-not-multiple-of-8-crop", lambda: [image_bytes((61, 67))], shapes=[[1, 4, 8, 7]]),
    ImageCase("size-not-multiple-of-8-resize", lambda: [image_bytes((61, 67))], shapes=[[1, 4, 8, 8]],
              request={"fit": "resize"}),
    ImageCase("mixed-sizes", lambda: [image_bytes((64, 64)), image_bytes((32, 48))],
              shapes=[[1, 4, 8, 8], [1, 4, 6, 4]],
              api_problem=r"all images of one request must have the same size after crop/resize"),
    ImageCase("bad-background-colour", lambda: [image_bytes(mode="RGBA")],
              r"not a colour: 'nope' \(use e\.g\. #ffffff or white\)", request={"background": "nope"}),
]  # fmt: skip


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.id for c in IMAGE_CASES])
def test_bad_images_through_the_ui(env: Env, case: ImageCase) -> None:
    paths = [str(env.put(f"img{i}.png", data)) for i, data in enumerate(case.images())]
    req = EncodeRequest(uploads=paths, **case.request)
    if case.problem is not None:
        with pytest.raises(UserError, match=case.problem):
            encode(env.host, req, Reporter())
        assert env.outputs() == []
    else:
        outcome = encode(env.host, req, Reporter())
        assert outcome.ok
        shapes = sorted(list(read_latents(p).latents.shape) for p in outcome.files)
        assert shapes == sorted(case.shapes or [])
    env.assert_contained()


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.id for c in IMAGE_CASES])
def test_bad_images_through_the_api(api_server, case: ImageCase) -> None:
    images = [base64.b64encode(data).decode() for data in case.images()]
    status, body, _ = call(api_server, "/vaebatch/v1/encode", {"images": images, **case.request})
    problem = case.api_problem or case.problem
    if problem is None:
        assert status == 200, body
        assert [body["shape"]] == case.shapes
    else:
        assert status == 422, body
        assert re.search(problem, f"{body['error']}: {body['detail']}"), body


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (webp_declaring(1 << 24, 1 << 24), r"larger than the 67108864-pixel limit"),
        (png_declaring(100_000, 100_000), r"decompression bomb"),
        (b"GIF89a" + b"\xff" * 20, None),
        (b"", None),
    ],
    ids=["webp-huge-canvas", "png-bomb", "damaged-gif", "empty"],
)
def test_the_metadata_reader_refuses_with_documented_errors(tmp_path: Path, data: bytes, problem) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(data)
    with pytest.raises((OSError, ValueError)) as info:
        read_info(path)
    if problem:
        assert re.search(problem, str(info.value))


def test_damaged_exif_counts_are_read_without_trusting_them(tmp_path: Path) -> None:
    """piexif trusts EXIF counts: a count of ~2**32 took minutes and gigabytes before MemoryError."""
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_with_exif_count(0xFFFFFFF0))
    before = rss_bytes()
    assert read_info(path)[0] is None
    assert rss_bytes() - before < 64 * MiB
    path.write_bytes(jpeg_with_exif_count(len("a cat") * 2 + 8))  # the true count: still read
    assert read_infotext(path) == "a cat"


# -- file-name patterns and prompts ------------------------------------------------------------------
PATTERN_CASES = [
    ("traversal-in-pattern", "../../[prompt]", "a cat"),
    ("traversal-in-prompt", "[prompt]", "../../../../etc/passwd"),
    ("absolute-pattern", "/etc/[seed]", "x"),
    ("backslash-traversal", "..\\..\\[prompt_spaces]", "..\\..\\win"),
    ("control-characters", "\x00\x01[prompt]\r\n\t\x7f", "a\x00b\x1b[31mc"),
    ("dot-only-pattern", "..", ""),
    ("over-long-name", "x" * 1000 + "[prompt]", "狐" * 400),
    ("datetime-with-separators", "[datetime<%Y/../%m>]", "p"),
    ("lone-surrogate-prompt", "[prompt]", "\ud800 bad"),
]


@pytest.mark.parametrize(
    ("pattern", "prompt"), [c[1:] for c in PATTERN_CASES], ids=[c[0] for c in PATTERN_CASES]
)
def test_hostile_patterns_and_prompts_stay_in_the_folder(env: Env, pattern: str, prompt: str) -> None:
    meta = {"parameters": json.dumps([f"{prompt}\nSteps: 20, Seed: 5, Size: 64x64"])}
    path = env.put("x.safetensors", st_file({"latents": torch.zeros(1, 4, 8, 8)}, meta))
    outcome = decode(env.host, DecodeRequest(uploads=[str(path)], pattern=pattern), Reporter())
    assert outcome.ok and len(outcome.images) == 1
    (saved,) = env.outputs()
    assert saved.parent == env.out / "images" and len(saved.name.encode()) <= 255
    assert not any(c in saved.name for c in "\\\x00\n\r\t\x7f")
    env.assert_contained()


# -- infotext -------------------------------------------------------------------------------------
INFOTEXT_CASES = [
    ("garbage-bytes", bytes(range(256)).decode("latin-1") * 4),
    ("very-long-line", "a, " * 300_000 + "\nSteps: 1, Seed: 2, Size: 8x8"),
    ("nul-bytes", "a\x00b\nNegative prompt: \x00\nSteps: 1\x00, Seed: 2, Size: 8x8"),
    ("only-newlines", "\n" * 10_000),
    ("unbalanced-quotes", 'Steps: "1, Seed: "\\", Size: "8x8'),
    ("many-parameters", ", ".join(f"K{i}: {i}" for i in range(20_000))),
]


@pytest.mark.parametrize("text", [c[1] for c in INFOTEXT_CASES], ids=[c[0] for c in INFOTEXT_CASES])
def test_hostile_infotext_is_parsed_and_kept(env: Env, text: str) -> None:
    parsed = infotext.parse(text)
    assert isinstance(parsed.prompt, str) and isinstance(parsed.params, dict)
    ours = {"VAE Batch": "on", "VAE Batch VAE": "approx", "VAE Batch family": "sd1"}
    merged = infotext.with_params(text, ours)
    assert infotext.parse(merged).params.items() >= ours.items()
    # Through a decode: the image is saved and carries the text with our keys added.
    meta = {"parameters": json.dumps([text])}
    path = env.put("x.safetensors", st_file({"latents": torch.zeros(1, 4, 8, 8)}, meta))
    outcome = decode(env.host, DecodeRequest(uploads=[str(path)], pattern="[prompt_words]"), Reporter())
    assert outcome.ok and len(outcome.images) == 1
    stored = read_infotext(outcome.images[0][0])
    assert stored == outcome.infotexts[0] and "VAE Batch: on" in stored
    env.assert_contained()


# -- the HTTP API ------------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


TENSOR = b64(np.full((1, 4, 8, 8), 0.1, np.float32).tobytes())
OK = {"tensor": TENSOR, "shape": [1, 4, 8, 8]}
PNG = b64(image_bytes())

# (id, path, JSON body or raw bytes, status, regex over "error: detail")
API_CASES: list[tuple[str, str, Any, int, str]] = [
    ("non-json-body", "decode", b"{not json", 400, r"the request body is not valid JSON"),
    ("not-utf8-body", "decode", b"\xff\xfe\x00", 400, r"the request body is not valid JSON"),
    ("deeply-nested-json", "decode", b"[" * 100_000 + b"]" * 100_000, 400, r"JSON: nested too deeply"),
    ("json-array-body", "decode", [OK], 422, r"the request body must be a JSON object"),
    ("json-number-body", "encode", 5, 422, r"the request body must be a JSON object"),
    ("empty-body", "decode", b"", 422, r"the request body must be a JSON object"),
    ("unknown-field", "decode", {**OK, "zzz": 1}, 422, r"unknown field\(s\): zzz"),
    ("unknown-field-encode", "encode", {"images": [PNG], "q": 1}, 422, r"unknown field\(s\): q"),
    ("invalid-base64", "decode", {"latents": "@@@"}, 422, r"'latents' is not valid base64"),
    ("invalid-base64-image", "encode", {"images": ["!!"]}, 422, r"'images\[0\]' is not valid base64"),
    ("data-url-without-data", "decode", {"latents": "data:foo"}, 422, r"'latents' is a data URL without"),
    ("neither-latents-nor-tensor", "decode", {}, 422, r"send either 'latents'"),
    ("both-latents-and-tensor", "decode", {**OK, "latents": "AAAA"}, 422, r"send either 'latents'"),
    ("huge-shape", "decode", {"tensor": "AAAA", "shape": [100_000, 4, 100_000, 100_000]}, 413,
     r"'shape' is too large to be latents"),
    ("astronomical-shape", "decode", {"tensor": "AAAA", "shape": [10**30, 4, 1, 1]}, 413, r"too large"),
    ("mismatched-byte-count", "decode", {"tensor": TENSOR, "shape": [1, 4, 8, 9]}, 422,
     r"the tensor bytes do not match shape and dtype: .*'bytes': 1024, 'expected': 1152"),
    ("unknown-dtype", "decode", {**OK, "dtype": "int8"}, 422, r"dtype must be one of float16, bfloat16"),
    ("3d-shape", "decode", {"tensor": TENSOR, "shape": [4, 8, 32]}, 422, r"'shape' must be \[batch, chan"),
    ("5d-shape", "decode", {"tensor": TENSOR, "shape": [1, 4, 1, 8, 8]}, 422, r"'shape' must be \[batch"),
    ("empty-batch-shape", "decode", {"tensor": "", "shape": [0, 4, 8, 8]}, 422, r"all positive"),
    ("channels-do-not-fit", "decode", {"tensor": TENSOR, "shape": [1, 16, 4, 4]}, 422,
     r"unusable latents: latents have 16 channels but the VAE takes 4"),
    ("nan-tensor", "decode", {"tensor": b64(np.full((1, 4, 2, 2), np.nan, np.float32).tobytes()),
                              "shape": [1, 4, 2, 2]}, 422, r"sample 0: latents contain NaN"),
    ("inf-tensor-fp16", "decode", {"tensor": b64(np.full((1, 4, 2, 2), np.inf, np.float16).tobytes()),
                                   "shape": [1, 4, 2, 2], "dtype": "float16"}, 422, r"latents contain Inf"),
    ("unknown-vae", "decode", {**OK, "vae": "nope.safetensors"}, 422, r"unknown VAE 'nope\.safetensors'"),
    ("unknown-vae-encode", "encode", {"images": [PNG], "vae": "nope"}, 422, r"unknown VAE 'nope'"),
    ("unknown-family", "decode", {**OK, "family": "sd9"}, 422, r"'family' must be one of sd1"),
    ("unknown-format", "decode", {**OK, "format": "gif"}, 422, r"'format' must be png, jpg or webp"),
    ("option-unknown-name", "decode", {**OK, "options": {"chunks": 2}}, 422, r"unknown engine option"),
    ("option-wrong-type", "decode", {**OK, "options": {"nan_check": "no"}}, 422,
     r"nan_check must be true or false, not 'no'"),
    ("option-string-budget", "decode", {**OK, "options": {"memory_budget": "1GB"}}, 422,
     r"memory_budget must be a positive integer"),
    ("option-negative-chunk", "decode", {**OK, "options": {"max_chunk": -1}}, 422,
     r"max_chunk must be a positive integer, not -1"),
    ("option-bool-as-chunk", "encode", {"images": [PNG], "options": {"max_chunk": True}}, 422,
     r"max_chunk must be a positive integer, not True"),
    ("option-absent-device", "decode", {**OK, "options": {"offload": "cuda:7"}}, 422,
     r"offload device 'cuda:7' is not available here|offload must be"),
    ("option-huge-fraction", "decode", {**OK, "options": {"memory_fraction": 10**400}}, 422,
     r"memory_fraction must be a number within 0\.05\.\.1"),
    ("options-not-an-object", "decode", {**OK, "options": [1]}, 422, r"'options' must be dict"),
    ("empty-image-list", "encode", {"images": []}, 422, r"'images' must be a non-empty list"),
    ("too-many-images", "encode", {"images": [""] * 257}, 413, r"at most 256 images per request"),
    ("parameters-count-mismatch", "encode", {"images": [PNG], "parameters": ["a", "b"]}, 422,
     r"'parameters' must be a list of strings, one per image"),
    ("bad-fit", "encode", {"images": [PNG], "fit": "zoom"}, 422, r"fit must be 'crop' or 'resize', not 'zo"),
    ("bad-latents-file", "decode", {"latents": b64(b"\x08" + b"\0" * 7 + b"{}      ")}, 422,
     r"unusable latents file: latents: no 'latents' tensor"),
    ("pickle-as-latents", "decode", {"latents": b64(pickle.dumps(Evil("true")))}, 422,
     r"unusable latents file: latents: (corrupt|truncated)"),
    *((f"{c}-channels-no-family-has", "decode",
       {"tensor": b64(np.full((1, c, 2, 2), 0.1, np.float32).tobytes()), "shape": [1, c, 2, 2], "save": True},
       422, "unusable latents: " + no_family(c)) for c in NO_FAMILY_CHANNELS),
    *((f"{c}-channels-file-no-family-has", "decode", {"latents": b64(latents(2, c, 2, 2)), "save": True},
       422, "unusable latents: " + no_family(c)) for c in NO_FAMILY_CHANNELS),
]  # fmt: skip

# Every field of both requests with a value of the wrong JSON type.
WRONG_TYPES: list[tuple[str, str, Any, str | None]] = [
    ("decode", "latents", 5, "str"), ("decode", "tensor", [1], "str"), ("decode", "dtype", 4, "str"),
    ("decode", "scaled", "yes", "bool"), ("decode", "family", 1, "str"), ("decode", "options", "x", "dict"),
    ("decode", "save", 1, "bool"), ("decode", "vae", {}, "str"), ("decode", "format", None, None),
    ("encode", "images", "x", "list"), ("encode", "options", 1, "dict"), ("encode", "vae", 1, "str"),
    ("encode", "fit", 1, "str"), ("encode", "alpha", [], "str"), ("encode", "background", 1, "str"),
    ("encode", "sample", "x", "bool"), ("encode", "seed", 1.5, "int"), ("encode", "parameters", "x", None),
]  # fmt: skip
for _path, _name, _value, _want in WRONG_TYPES:
    _base = {"images": [PNG]} if _path == "encode" else dict(OK)
    if _name == "latents":
        _base = {}
    if _want is None:  # null is "not given"; a string for a list has its own message
        if _value is None:
            continue
        API_CASES.append((f"wrong-type-{_path}-{_name}", _path, {**_base, _name: _value}, 422, "parameters"))
        continue
    API_CASES.append(
        (f"wrong-type-{_path}-{_name}", _path, {**_base, _name: _value}, 422, rf"'{_name}' must be {_want}")
    )
API_CASES.append(
    ("wrong-type-decode-shape", "decode", {**OK, "shape": "1,4,8,8"}, 422, r"'shape' must be a list")
)


@pytest.mark.parametrize(
    ("path", "body", "status", "problem"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_bad_api_requests(api_server, path: str, body: Any, status: int, problem: str) -> None:
    raw = body if isinstance(body, bytes) else None
    written = output_files(api_server)
    before = rss_bytes(api_server.proc.pid)
    got, answer, headers = call(
        api_server, f"/vaebatch/v1/{path}", None if raw is not None else body, raw=raw
    )
    assert got == status, answer
    assert headers.get("content-type", "").startswith("application/json")
    assert set(answer) == {"error", "detail"}
    assert re.search(problem, f"{answer['error']}: {answer['detail']}"), answer
    assert rss_bytes(api_server.proc.pid) - before < 64 * MiB
    assert output_files(api_server) == written


def output_files(server) -> list[Path]:
    return sorted(p for p in server.out.rglob("*") if p.is_file())


@pytest.mark.parametrize("channels", NO_FAMILY_CHANNELS)
def test_remote_decode_refuses_channel_counts_no_family_has(api_server, channels: int) -> None:
    """The Hybrid Inference endpoint answers 422 naming the problem; the next request still works."""

    def remote(c: int) -> tuple[int, Any]:
        query = "&".join(f"shape={n}" for n in (1, c, 2, 2)) + "&dtype=float32&output_type=pt"
        req = urllib.request.Request(
            url(api_server, f"/vaebatch/v1/remote/decode?{query}"),
            data=np.full((1, c, 2, 2), 0.1, np.float32).tobytes(),
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    written = output_files(api_server)
    status, answer = remote(channels)
    assert status == 422, answer
    assert re.search("unusable latents: " + no_family(channels), f"{answer['error']}: {answer['detail']}")
    assert output_files(api_server) == written
    status, tensor = remote(4)
    assert status == 200 and len(tensor) == 1 * 3 * 16 * 16 * 2, tensor[:200]  # [1, 3, 16, 16] float16


def test_oversized_body_is_refused_with_413(api_server) -> None:
    body = b'{"tensor": "' + b"A" * (64 * MiB) + b'"}'
    status, answer = post_large(api_server, "/vaebatch/v1/decode", body)
    assert status == 413 and answer["error"] == "request too large"
    assert answer["detail"]["limit_bytes"] == 64 * MiB


def test_api_save_with_hostile_infotext_stays_in_the_output_folder(api_server) -> None:
    meta = {"parameters": json.dumps(["../../../x\x00\nSteps: 1, Seed: 2, Size: 64x64"] * 2),
            "sources": json.dumps(["../../../../tmp/evil.png", "/etc/passwd"])}  # fmt: skip
    data = st_file({"latents": torch.zeros(2, 4, 8, 8)}, meta)
    status, answer, _ = call(api_server, "/vaebatch/v1/decode", {"latents": b64(data), "save": True})
    assert status == 200, answer
    assert len(answer["images"]) == len(answer["saved"]) == 2
    for saved in answer["saved"]:
        path = Path(saved)
        assert path.parent == api_server.out / "images" and path.is_file()
    root = api_server.out.parent
    assert {p.name for p in root.iterdir()} <= {"out", "server.log"}
    assert all(p.parent.parent == api_server.out for p in api_server.out.rglob("*") if p.is_file())


def test_the_corpus_covers_at_least_thirty_kinds() -> None:
    kinds = len(FILE_CASES) + len(IMAGE_CASES) + len(PATTERN_CASES) + len(INFOTEXT_CASES) + len(API_CASES)
    assert kinds >= 30
