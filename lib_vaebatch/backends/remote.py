"""A VAE on another machine, spoken to with diffusers' Hybrid Inference protocol (the one
``remote_decode``/``remote_encode`` use; docs/domain-reference.md §4): our own
``/vaebatch/v1/remote/decode`` and ``/encode`` endpoints, and in principle Hugging Face's.

Standard library only (``urllib.request``). Decodes ask for ``output_type=pt`` with
``partial_postprocess=False`` (float16 NCHW in [-1, 1], the full-quality tensor answer) and send
raw latents (no scaling parameters: the engine has already un-scaled them). Encodes send the pixels
as a float32 tensor in [0, 1] (unambiguous under diffusers' image-processor convention) or, with
``encode_as="png"``, as PNG (lossless for pixels that came from 8-bit images), and get raw latents.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from lib_vaebatch.backends.base import Moments, Op, VAEBackend
from lib_vaebatch.families import Family, get_family

log = logging.getLogger("vaebatch")

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "uint8": torch.uint8,
}
EncodeAs = Literal["tensor", "png"]


class RemoteVAEError(RuntimeError):
    """A request to the endpoint failed; the message names the endpoint and the server's error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """``http://user:pass@host/...`` -> the URL without credentials, and the credentials."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    clean = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    user = urllib.parse.unquote(parts.username)
    return clean, (user, urllib.parse.unquote(parts.password or ""))


def _endpoints(url: str, encode_url: str | None) -> tuple[str, str]:
    """Our layout (``.../remote/decode`` + ``.../remote/encode``, or their parent ``.../remote``)
    or one URL for both (Hugging Face's endpoints)."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")

    def with_path(p: str) -> str:
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, p, parts.query, parts.fragment))

    if path.endswith("/remote"):
        return with_path(path + "/decode"), encode_url or with_path(path + "/encode")
    if encode_url is None and path.endswith("/decode"):
        return url, with_path(path[: -len("decode")] + "encode")
    return url, encode_url or url


class RemoteVAE(VAEBackend):
    """A VAE behind a Hybrid Inference endpoint.

    ``endpoint``: the decode URL (``http://host:7860/vaebatch/v1/remote/decode``; the encode URL is
    derived from it, or the same URL for single-URL servers; ``encode_endpoint`` overrides).
    ``family``: the model family whose scaling constants the engine uses (None: asked from the
    server's ``GET`` info where it has one, else sd1). Connection errors and 5xx answers are retried
    ``retries`` times with exponential backoff (``backoff`` seconds, doubling); 4xx answers and read
    timeouts are not. At most ``max_batch`` samples go in one request.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        family: Family | str | None = None,
        encode_endpoint: str | None = None,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_batch: int = 4,
        auth: tuple[str, str] | None = None,
        token: str | None = None,
        encode_as: EncodeAs = "tensor",
        dtype: torch.dtype = torch.float32,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries}")
        if encode_as not in ("tensor", "png"):
            raise ValueError(f"encode_as must be 'tensor' or 'png', not {encode_as!r}")
        url, userinfo = _split_userinfo(endpoint.strip())
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"remote VAE endpoint must be an http(s) URL, not {endpoint!r}")
        self.decode_url, self.encode_url = _endpoints(url, encode_endpoint)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_batch = int(max_batch)
        self.encode_as: EncodeAs = encode_as
        self._sleep = sleep
        self._headers: dict[str, str] = {}
        auth = auth or userinfo
        if auth is not None:
            pair = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {pair}"
        elif token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._dtype = dtype
        self.name = f"remote:{urllib.parse.urlsplit(url).netloc}"
        if family is not None:
            self.family = get_family(family) if isinstance(family, str) else family
            self.family_source = "given"
        else:
            self.family, self.family_source = self._probe_family()

    # -- interface ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype latents travel in (the server picks its own compute precision)."""
        return self._dtype

    def set_dtype(self, dtype: torch.dtype) -> None:
        self._dtype = dtype

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype in (torch.float16, torch.bfloat16, torch.float32)

    # The engine holds the answers (fp16 bytes, their copy, the float32 tensor) and nothing else:
    # per output pixel and byte of dtype a few bytes, no attention, nothing fixed.
    def bytes_per_pixel(self, op: Op) -> float:
        return 16.0

    def fixed_bytes(self, op: Op) -> int:
        return 1 << 20

    def attention_tokens(self, op: Op, pixels: int) -> int:
        return 0

    def max_efficient_chunk(self, op: Op) -> int | None:
        return self.max_batch

    def supports_tiling(self, op: Op) -> bool:
        return False  # the server does its own memory management

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents ``[B, C, h, w]`` to float32 pixels ``[B, 3, 8h, 8w]`` in [-1, 1]."""
        z = latents.detach().to("cpu", self._dtype)
        out = []
        for start in range(0, z.shape[0], self.max_batch):
            part = z[start : start + self.max_batch]
            params = [
                ("image_format", "jpg"),
                ("output_type", "pt"),
                ("partial_postprocess", "False"),
                *(("shape", str(n)) for n in part.shape),
                ("dtype", _dtype_name(part.dtype)),
            ]
            headers = {"Content-Type": "tensor/binary", "Accept": "tensor/binary"}
            pixels = self._post_tensor(self.decode_url, _to_bytes(part), params, headers).float()
            b, _, h, w = part.shape
            want = [b, 3, h * self.downscale, w * self.downscale]
            if list(pixels.shape) != want:
                got = list(pixels.shape)
                raise RemoteVAEError(f"{self.decode_url}: answered shape {got}, expected {want}")
            out.append(pixels)
        return torch.cat(out)

    def encode(self, pixels: torch.Tensor) -> Moments:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] to raw latent means (no variance comes back)."""
        x = ((pixels.detach().to("cpu", torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0)
        step = 1 if self.encode_as == "png" else self.max_batch
        out = []
        for start in range(0, x.shape[0], step):
            part = x[start : start + step]
            if self.encode_as == "png":
                data, params = _png_bytes(part[0]), []
            else:
                params = [*(("shape", str(n)) for n in part.shape), ("dtype", "float32")]
                data = _to_bytes(part)
            z = self._post_tensor(self.encode_url, data, params, {}).float()
            b, _, h, w = part.shape
            if z.ndim != 4 or z.shape[0] != b or z.shape[1] != self.latent_channels:
                raise RemoteVAEError(
                    f"{self.encode_url}: answered shape {list(z.shape)}, expected "
                    f"[{b}, {self.latent_channels}, {h // self.downscale}, {w // self.downscale}]"
                )
            out.append(z)
        return Moments(torch.cat(out))

    # -- HTTP -----------------------------------------------------------------------------------
    def _post_tensor(
        self, url: str, data: bytes, params: Sequence[tuple[str, str]], headers: dict[str, str]
    ) -> torch.Tensor:
        body, answer_headers = self._request("POST", url, data, params, headers)
        try:
            shape = json.loads(answer_headers["shape"])
            dtype = WIRE_DTYPES[answer_headers["dtype"]]
            return torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise RemoteVAEError(
                f"{url}: the answer is not a tensor with shape/dtype headers ({type(exc).__name__}: {exc})"
            ) from None

    def _request(
        self,
        method: str,
        url: str,
        data: bytes | None,
        params: Sequence[tuple[str, str]],
        headers: dict[str, str],
        *,
        retries: int | None = None,
        timeout: float | None = None,
    ) -> tuple[bytes, dict[str, str]]:
        full = _with_query(url, params)
        tries = (self.retries if retries is None else retries) + 1
        last = ""
        for attempt in range(tries):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                log.info("remote VAE %s: %s; retry %d/%d in %.1f s", url, last, attempt, tries - 1, delay)
                self._sleep(delay)
            req = urllib.request.Request(full, data=data, method=method, headers={**self._headers, **headers})
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                    return resp.read(), {k.lower(): v for k, v in resp.headers.items()}
            except urllib.error.HTTPError as exc:
                text = _error_text(exc)
                if exc.code < 500:
                    raise RemoteVAEError(f"{url}: HTTP {exc.code}: {text}", exc.code) from None
                last = f"HTTP {exc.code}: {text}"
            except urllib.error.URLError as exc:  # refused, reset, DNS, connect timeout
                last = f"cannot connect ({exc.reason})"
            except (ConnectionError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):  # the request may be running: do not repeat it
                    raise RemoteVAEError(f"{url}: no answer within {timeout or self.timeout:.0f} s") from None
                last = f"connection lost ({exc})"
        raise RemoteVAEError(f"{url}: {last} (after {tries} attempt{'s' if tries > 1 else ''})")

    def info(self) -> dict[str, Any]:
        """The server's ``GET`` description (ours: family, constants, VAE labels)."""
        body, _ = self._request("GET", self.decode_url, None, [], {"Accept": "application/json"})
        try:
            value = json.loads(body)
        except ValueError:
            raise RemoteVAEError(f"{self.decode_url}: GET did not answer JSON") from None
        if not isinstance(value, dict):
            raise RemoteVAEError(f"{self.decode_url}: GET did not answer a JSON object")
        return value

    def _probe_family(self) -> tuple[Family, str]:
        try:
            body, _ = self._request(
                "GET", self.decode_url, None, [], {"Accept": "application/json"}, retries=0, timeout=10.0
            )
            name = json.loads(body).get("family")
            return get_family(str(name)), "remote"
        except (RemoteVAEError, ValueError, AttributeError, TypeError) as exc:
            log.warning("remote VAE %s: family unknown (%s); assuming sd1", self.decode_url, exc)
            return get_family("sd1"), "default"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def _to_bytes(t: torch.Tensor) -> bytes:
    """Raw C-order bytes (little-endian hosts), as diffusers' client sends them."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _png_bytes(unit: torch.Tensor) -> bytes:
    from PIL import Image

    arr = (unit * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG")
    return buf.getvalue()


def _with_query(url: str, params: Sequence[tuple[str, str]]) -> str:
    if not params:
        return url
    return url + ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(list(params))


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The server's JSON ``{"error", "detail"}`` on one line, else the start of its body."""
    try:
        raw = exc.read()
    except OSError:
        raw = b""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", "replace").strip() or str(exc.reason)
    if isinstance(value, dict) and "error" in value:
        detail = value.get("detail")
        text = str(value["error"])
        if detail not in (None, "", [], {}):
            text += f" ({json.dumps(detail) if not isinstance(detail, str) else detail})"
        return text.replace("\n", " ")
    return json.dumps(value)


__all__ = ["RemoteVAE", "RemoteVAEError"]
