"""Real tiny VAEs (seeded, CPU) and the few wrappers the engine tests need."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lib_vaebatch.backends.base import Moments, Op, VAEBackend
from lib_vaebatch.backends.diffusers_vae import DiffusersVAE
from lib_vaebatch.families import get_family
from lib_vaebatch.tiling import TileSettings

# Four levels, so latents are 1/8 of the image as in every SD-family VAE; widths are multiples of
# 32 (the GroupNorm group count the shipped configs use) and change between levels, so the
# shortcut convs exist too.
TINY_WIDTHS = (32, 64, 64, 64)


def tiny_autoencoder(
    latent_channels: int = 4,
    *,
    layers_per_block: int = 1,
    seed: int = 0,
    widths: tuple[int, ...] = TINY_WIDTHS,
) -> torch.nn.Module:
    import diffusers
    from diffusers import AutoencoderKL

    diffusers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    quant = latent_channels == 4  # SD3/Flux VAEs have no quant convs
    vae = AutoencoderKL(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=32,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    )
    return vae.eval().requires_grad_(False)


def tiny_backend(latent_channels: int = 4, *, family: str | None = None, seed: int = 0, **kw) -> DiffusersVAE:
    fam = get_family(family or ("sd1" if latent_channels == 4 else "flux"))
    module = tiny_autoencoder(latent_channels, seed=seed, **kw)
    module.register_to_config(scaling_factor=fam.scaling_factor, shift_factor=fam.shift_factor or None)
    return DiffusersVAE(module, fam, name=f"tiny-{fam.name}")


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, which is Python 3.11+; on 3.10 (A1111's) the same ``__notes__`` list,
    which pytest shows there too."""
    if sys.version_info >= (3, 11):
        exc.add_note(note)  # novermin - guarded by the version check above
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]


def cpu_runs_fp16() -> bool:
    """Whether this torch has fp16 convolution, GroupNorm and upsampling on the CPU (torch 2.1, which
    A1111 1.10.1 ships, has none: ``"slow_conv2d_cpu" not implemented for 'Half'``). Probed by running
    them, independently of the engine's own probe, which a test compares with this one."""
    import torch.nn.functional as F

    x = torch.ones(1, 4, 4, 4, dtype=torch.float16)
    try:
        y = F.group_norm(F.conv2d(x, torch.ones(4, 4, 3, 3, dtype=torch.float16), padding=1), 2)
        F.interpolate(y, scale_factor=2.0, mode="nearest")
    except RuntimeError:
        return False
    return True


needs_fp16_cpu = pytest.mark.skipif(
    not cpu_runs_fp16(), reason="this torch has no fp16 conv/GroupNorm/upsampling on the CPU (torch 2.1)"
)


@dataclass(frozen=True)
class Overflow:
    """How to make :func:`overflowing_backend` overflow: samples multiplied by ``factor`` decode to
    non-finite values in ``dtype`` and to finite ones in ``rung``, the next precision up, that has
    more range; other samples are finite in both."""

    dtype: torch.dtype
    rung: torch.dtype
    factor: float

    @property
    def names(self) -> tuple[str, str]:
        from lib_vaebatch.devices import dtype_name

        return dtype_name(self.dtype), dtype_name(self.rung)


#: Every precision pair whose overflow the CPU can compute for real: fp16 -> bf16 where this torch
#: has fp16 kernels on the CPU, and always fp32 -> fp64 (latents x1e37 overflow fp32's 3.4e38 in the
#: scaled-up input conv; fp64 holds them).
OVERFLOWS = [
    pytest.param(Overflow(torch.float16, torch.bfloat16, 40.0), marks=needs_fp16_cpu, id="fp16-bf16"),
    pytest.param(Overflow(torch.float32, torch.float64, 1e37), id="fp32-fp64"),
]


def overflowing_backend(seed: int = 0) -> DiffusersVAE:
    """A tiny VAE whose decoder input conv is scaled up so that activations overflow (NaN in the
    output) for latents of large magnitude: x40 overflows fp16 while bf16 and fp32 stay finite,
    x1e37 overflows fp32 (and bf16) while fp64 stays finite (see :data:`OVERFLOWS`)."""
    vae = tiny_backend(seed=seed)
    with torch.no_grad():
        vae.module.decoder.conv_in.weight.mul_(3000.0)
        vae.module.decoder.conv_in.bias.mul_(3000.0)
    return vae


def save_module(module: torch.nn.Module, path: Path, *, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return path


class Recorder(VAEBackend):
    """Delegates to a real backend and records what each decode call saw: the chunk size and the
    first latent value of every sample (tests give each sample a distinct one to identify it)."""

    def __init__(self, inner: VAEBackend) -> None:
        self.inner = inner
        self.family = inner.family
        self.name = f"recorded {inner.name}"
        self.calls: list[tuple[int, torch.dtype, list[float]]] = []

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def scaling_factor(self) -> float:
        return self.inner.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.inner.shift_factor

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.inner.set_dtype(dtype)

    def max_efficient_chunk(self, op: Op) -> int | None:
        return None  # let memory decide, so chunking is exercised on the CPU too

    def fixed_bytes(self, op: Op) -> int:
        return self.inner.fixed_bytes(op)

    def tiling_program(self, op: Op):  # type: ignore[no-untyped-def]
        return self.inner.tiling_program(op)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        self.calls.append((latents.shape[0], self.inner.dtype, latents[:, 0, 0, 0].double().tolist()))
        return self.inner.decode(latents)

    def encode(self, pixels: torch.Tensor) -> Moments:
        self.calls.append((pixels.shape[0], self.inner.dtype, pixels[:, 0, 0, 0].double().tolist()))
        return self.inner.encode(pixels)

    def decoded_markers(self) -> list[float]:
        return [m for _n, _dt, markers in self.calls for m in markers]


class OOMAbove(Recorder):
    """Fault injection: raises the real CUDA out-of-memory error type for chunks above ``limit``
    (``limit=0``: always). Its tiled path, when enabled, decodes normally and records the call."""

    def __init__(self, inner: VAEBackend, limit: int, *, tiling: bool = False) -> None:
        super().__init__(inner)
        self.limit = limit
        self.tiling = tiling
        self.tiled_calls = 0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.shape[0] > self.limit:
            big = torch.empty(1024)  # an allocation the handler must let go of
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {latents.shape[0]} GiB (injected; {big.numel()})"
            )
        return super().decode(latents)

    def supports_tiling(self, op: Op) -> bool:
        return self.tiling

    def decode_tiled(self, latents: torch.Tensor, settings: object) -> torch.Tensor:
        self.tiled_calls += 1
        return super().decode(latents)


def marked_latents(
    n: int, channels: int = 4, size: int = 8, *, seed: int = 0, scale: float = 1.0
) -> torch.Tensor:
    """Seeded latents whose first element identifies the sample (sample i: 0.1 * (i + 1))."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, channels, size, size, generator=g) * scale
    for i in range(n):
        z[i, 0, 0, 0] = 0.1 * (i + 1)
    return z


def identify(markers: list[float], latents: torch.Tensor, scaling: float) -> list[int]:
    """Map recorded first values (raw space) back to sample indices."""
    expected = (latents[:, 0, 0, 0].double() / scaling).tolist()
    return [min(range(len(expected)), key=lambda i: abs(expected[i] - m)) for m in markers]


def structured_image(width: int, height: int, seed: int = 0) -> torch.Tensor:
    """A non-stationary test picture in [-1, 1] ``[1, 3, H, W]``: a dark half, a bright half, and
    coloured discs across both."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (20, 25, 35))
    draw = ImageDraw.Draw(img)
    draw.rectangle((width // 2, 0, width, height), fill=(235, 225, 200))
    for _ in range(12):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(8, max(9, width // 6))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


def trained_autoencoder(steps: int = 100, seed: int = 5) -> torch.nn.Module:
    """A tiny VAE briefly trained (seeded, CPU, ~10 s) to reconstruct structured pictures, so its
    decoder behaves like a trained one (outputs in [-1, 1], smooth features) rather than like a
    randomly initialised one (outputs of +-5..10)."""
    torch.manual_seed(seed)
    vae = tiny_autoencoder(4, seed=seed).train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for step in range(steps):
        x = torch.cat([structured_image(64, 64, step * 4 + i) for i in range(4)])
        posterior = vae.encode(x).latent_dist
        loss = (vae.decode(posterior.sample()).sample - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.eval().requires_grad_(False)


def record_tile_settings(monkeypatch: pytest.MonkeyPatch) -> list[TileSettings]:
    """Every :class:`TileSettings` the engine builds for a tiled call (a spy on the runner's), to
    see which mode and spill store a surface's options reached the tiler with."""
    from lib_vaebatch.engine import runner

    seen: list[TileSettings] = []
    real = runner.TileSettings

    def spy(*args: object, **kwargs: object) -> TileSettings:
        made = real(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(made)
        return made

    monkeypatch.setattr(runner, "TileSettings", spy)
    return seen


@dataclass
class TensorPeak:
    """What :func:`tensor_peak` measured: the highest rise of live CPU tensor bytes in the block
    (``peak``) and where it ended (``end``), both relative to its start."""

    peak: int = 0
    end: int = 0


@contextlib.contextmanager
def tensor_peak() -> Iterator[TensorPeak]:
    """Measure the CPU tensor memory a block really allocates: every allocation and free torch's
    CPU allocator reports to the profiler (``profile_memory``), summed in time order. Only what the
    allocator holds counts, so a value written to a spill file costs nothing here and one kept in
    memory costs its bytes; allocations on intra-op worker threads are not seen (torch allocates
    op outputs on the calling thread)."""
    from torch.profiler import ProfilerActivity, profile

    found = TensorPeak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield found
    cpu = torch.autograd.DeviceType.CPU
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu
    ]
    when = (lambda e: e.start_ns()) if events and hasattr(events[0], "start_ns") else (lambda e: e.start_us())
    now = 0
    for e in sorted(events, key=when):  # torch 2.1 has start_us only
        now += e.nbytes()
        found.peak = max(found.peak, now)
    found.end = now


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (clamped, compared on [0, 1])."""
    import math

    mse = (((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


class OOMUntiled(Recorder):
    """Fault injection: every untiled decode/encode runs out of memory (as at an image size that does
    not fit); the backend's real tiled path, which uses the inner VAE's program, works."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    def encode(self, pixels: torch.Tensor) -> Moments:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")


class OOMBigTiles(OOMUntiled):
    """Fault injection one level down: untiled runs out of memory, and so does a tiled run whose tile
    is wider than ``limit`` latent pixels, part-way through (after its first tile), as a real
    allocation failure inside the tiler would."""

    def __init__(self, inner: VAEBackend, limit: int) -> None:
        super().__init__(inner)
        self.limit = limit
        self.tile_sizes: list[int] = []

    def decode_tiled(self, latents: torch.Tensor, settings: TileSettings) -> torch.Tensor:
        outer = settings.progress

        def progress(done: int, total: int) -> None:
            assert settings.used_tile is not None
            if done == 1:
                self.tile_sizes.append(settings.used_tile)
            if settings.used_tile > self.limit:
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {settings.used_tile} GiB (injected, in tiles)"
                )
            if outer is not None:
                outer(done, total)

        settings.progress = progress
        return super().decode_tiled(latents, settings)


class OOMTiledWhere(OOMUntiled):
    """Fault injection inside the tiler: untiled runs out of memory, and so does a tiled run for
    which ``fails(settings)`` is true (it sees the planned mode, tile and peak), part-way through
    (at its first tile). Records ``(mode, tile, planned_bytes)`` of every tiled run started."""

    def __init__(self, inner: VAEBackend, fails: Callable[[TileSettings], bool]) -> None:
        super().__init__(inner)
        self.fails = fails
        self.runs: list[tuple[str | None, int | None, int | None]] = []

    def _wrap(self, settings: TileSettings) -> None:
        outer = settings.progress

        def progress(done: int, total: int) -> None:
            if done == 1:
                self.runs.append((settings.used_mode, settings.used_tile, settings.planned_bytes))
                if self.fails(settings):
                    raise torch.cuda.OutOfMemoryError(
                        f"CUDA out of memory (injected in {settings.used_mode} tiles of {settings.used_tile})"
                    )
            if outer is not None:
                outer(done, total)

        settings.progress = progress

    def decode_tiled(self, latents: torch.Tensor, settings: TileSettings) -> torch.Tensor:
        self._wrap(settings)
        return super().decode_tiled(latents, settings)

    def encode_tiled(self, pixels: torch.Tensor, settings: TileSettings) -> Moments:
        self._wrap(settings)
        return super().encode_tiled(pixels, settings)
