"""diffusers ``AutoencoderKL`` backend: single-file ``.safetensors`` VAEs (ldm or diffusers naming),
whole checkpoints (their ``first_stage_model.*``), and diffusers folders.

Configs for SD1/SD2, SDXL, SD3 and Flux ship in ``lib_vaebatch/configs``; the architecture is read
from the weights' shapes, so non-standard sizes load too. Nothing is ever fetched from a hub, and
pickle-based files are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lib_vaebatch.backends.base import Moments, Op, VAEBackend, module_tiling_program
from lib_vaebatch.backends.keys import WeightsFormatError, to_diffusers_naming, vae_key_map
from lib_vaebatch.devices import default_dtype, resolve_device
from lib_vaebatch.families import (
    Family,
    default_family_for_channels,
    family_for_scaling,
    get_family,
)
from lib_vaebatch.layout import TUNER, LayoutScope, LayoutTuner
from lib_vaebatch.tensorfile import TensorFileError, open_safetensors
from lib_vaebatch.tiling.program import Program

if TYPE_CHECKING:
    from lib_vaebatch.tiling import TileSettings

log = logging.getLogger("vaebatch")

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class VAELoadError(ValueError):
    """A VAE file or folder that cannot be loaded; the message names it and the problem."""


def family_config(family: str) -> dict[str, Any]:
    """The shipped diffusers config for a family (sd1, sd2, sdxl, sd3, flux)."""
    text = resources.files("lib_vaebatch").joinpath("configs", f"{get_family(family).name}.json").read_text()
    return json.loads(text)


def infer_architecture(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Structural config fields read off diffusers-named weights (block widths, depth, channels)."""
    widths: list[int] = []
    while (w := state.get(f"encoder.down_blocks.{len(widths)}.resnets.0.conv2.weight")) is not None:
        widths.append(int(w.shape[0]))
    required = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
    missing = [k for k in required if k not in state]
    if not widths or missing:
        what = missing[0] if missing else "encoder.down_blocks.0"
        raise WeightsFormatError(
            f"the weights have no complete AutoencoderKL encoder and decoder (no {what})"
        )
    layers = {
        int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))
    }
    return {
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "layers_per_block": len(layers),
        "latent_channels": int(state["decoder.conv_in.weight"].shape[1]),
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": any(k.startswith("decoder.mid_block.attentions.") for k in state),
    }


def _family_from_metadata(meta: dict[str, str]) -> Family | None:
    if fam := meta.get("vaebatch.family") or meta.get("family"):
        with contextlib.suppress(ValueError):
            return get_family(fam)
    arch = meta.get("modelspec.architecture", "").lower()
    for needle, name in (("flux", "flux"), ("stable-diffusion-3", "sd3"), ("xl", "sdxl"), ("v2", "sd2")):
        if needle in arch:
            return get_family(name)
    if "stable-diffusion-v1" in arch:
        return get_family("sd1")
    return None


def _family_from_filename(path: Path) -> Family | None:
    name = path.name.lower()
    if "flux" in name or name == "ae.safetensors":
        return get_family("flux")
    if "sd3" in name:
        return get_family("sd3")
    if "sdxl" in name or re.search(r"(^|[^a-z])xl([^a-z]|$)", name):
        return get_family("sdxl")
    return None


def choose_family(
    given: str | None,
    channels: int,
    *,
    config: dict[str, Any] | None = None,
    meta: dict[str, str] | None = None,
    path: Path | None = None,
) -> tuple[Family, str]:
    """The family and how it was decided: given, config, metadata, filename, or channels."""
    candidates: list[tuple[Family | None, str]] = []
    if given:
        candidates.append((get_family(given), "given"))
    if config and config.get("scaling_factor") is not None:
        candidates.append((family_for_scaling(float(config["scaling_factor"]), channels), "config"))
    if meta:
        candidates.append((_family_from_metadata(meta), "metadata"))
    if path is not None:
        candidates.append((_family_from_filename(path), "filename"))
    for fam, source in candidates:
        if fam is None:
            continue
        if fam.latent_channels != channels:
            if source == "given":
                raise VAELoadError(
                    f"family {fam.name} has {fam.latent_channels} latent channels but the VAE has {channels}"
                )
            continue
        return fam, source
    return default_family_for_channels(channels), "channels"


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Only the VAE's tensors (a whole checkpoint's UNet is never read) and the header metadata."""
    try:
        with open_safetensors(path) as f:
            meta = dict(f.metadata() or {})
            state = {key: f.get_tensor(name) for key, name in vae_key_map(f.keys()).items()}
    except TensorFileError as exc:
        raise VAELoadError(str(exc)) from None
    return state, meta


class DiffusersVAE(VAEBackend):
    """A diffusers ``AutoencoderKL`` (built from our configs or a diffusers folder)."""

    def __init__(
        self,
        module: torch.nn.Module,
        family: Family,
        *,
        name: str,
        family_source: str = "given",
        path: Path | None = None,
    ) -> None:
        self.module = module.eval().requires_grad_(False)
        self.family = family
        self.family_source = family_source
        self.name = name
        self._path = path
        self._hash: str | None = None
        self._programs: dict[str, Program] = {}
        #: Which CPU memory layout each input shape runs in (process-wide by default; tests inject one).
        self.tuner: LayoutTuner = TUNER
        self._layouts: LayoutScope | None = None
        param = next(module.parameters())
        self._device = param.device
        self._dtype = param.dtype

    # -- interface ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def latent_channels(self) -> int:
        return int(self.module.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.module.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.module.config.shift_factor or 0.0)

    @property
    def file_hash(self) -> str | None:  # type: ignore[override]
        if self._hash is None and self._path is not None and self._path.is_file():
            self._hash = _file_hash(self._path)
        return self._hash

    def set_dtype(self, dtype: torch.dtype) -> None:
        # nn.Module.to directly: diffusers' override warns about "modules kept in float32".
        torch.nn.Module.to(self.module, dtype=dtype)
        self._dtype = dtype

    def to(self, device: torch.device | str) -> DiffusersVAE:
        self._device = resolve_device(device)
        torch.nn.Module.to(self.module, device=self._device)
        return self

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self._device, self._dtype)
        if self._device.type == "cuda":
            z = z.contiguous(memory_format=torch.channels_last)
        if self._layouts is not None:
            return self._layouts.run("decode", z, self._decode)
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.module.decode(z, return_dict=False)[0]

    def encode(self, pixels: torch.Tensor) -> Moments:
        x = pixels.to(self._device, self._dtype)
        if self._device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if self._layouts is not None:
            mean, logvar = self._layouts.run("encode", x, self._encode)
        else:
            mean, logvar = self._encode(x)
        return Moments(mean, logvar)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.module.encode(x, return_dict=False)[0]
        return dist.mean, dist.logvar

    def tiling_program(self, op: Op) -> Program:
        if op not in self._programs:
            self._programs[op] = module_tiling_program(self.module, op)
        return self._programs[op]

    def decode_tiled(self, latents: torch.Tensor, settings: TileSettings) -> torch.Tensor:
        if self._layouts is not None:
            self._layouts.use_original_weights()  # tiles run in the module's own layout
        return super().decode_tiled(latents, settings)

    def encode_tiled(self, pixels: torch.Tensor, settings: TileSettings) -> Moments:
        if self._layouts is not None:
            self._layouts.use_original_weights()
        return super().encode_tiled(pixels, settings)

    def _layout_parts(self) -> dict[str, list[torch.nn.Module]]:
        m = self.module
        parts = {
            "decode": [getattr(m, "post_quant_conv", None), getattr(m, "decoder", None)],
            "encode": [getattr(m, "encoder", None), getattr(m, "quant_conv", None)],
        }
        return {op: [p for p in mods if isinstance(p, torch.nn.Module)] or [m] for op, mods in parts.items()}

    @contextlib.contextmanager
    def prepare_for_speed(self, layout: str = "auto") -> Iterator[None]:
        """For the job only (other users of the module see it as they left it). On the CPU: the
        memory layout measured fastest for each input shape (``layout`` "auto"; see
        lib_vaebatch/layout.py), or the one given. On CUDA: channels_last weights and cuDNN
        autotuning."""
        if self._device.type == "cpu":
            if self._layouts is not None:  # nested job: the outer one's scope stays
                yield
                return
            scope = LayoutScope(self.module, self._layout_parts(), tuner=self.tuner, choice=layout)  # type: ignore[arg-type]
            self._layouts = scope
            try:
                yield
            finally:
                self._layouts = None
                scope.close()
            return
        if self._device.type != "cuda":
            yield
            return
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        torch.nn.Module.to(self.module, memory_format=torch.channels_last)
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = previous
            torch.nn.Module.to(self.module, memory_format=torch.contiguous_format)


def _build_module(config: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    import inspect

    from diffusers import AutoencoderKL

    accepted = set(inspect.signature(AutoencoderKL.__init__).parameters)
    kwargs = {k: v for k, v in config.items() if k in accepted}
    dropped = {k for k in config if not k.startswith("_") and k not in accepted}
    if dropped & {"use_quant_conv", "use_post_quant_conv"} and not (
        config.get("use_quant_conv", True) and config.get("use_post_quant_conv", True)
    ):
        raise VAELoadError(f"{where}: this VAE has no quant convs; it needs diffusers >= 0.30")
    try:
        with torch.device("meta"):  # no random init of weights we are about to replace
            module = AutoencoderKL(**kwargs)
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise VAELoadError(f"{where}: weights do not fit an AutoencoderKL ({exc})") from None
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
        raise VAELoadError(f"{where}: weights do not fit an AutoencoderKL: {'; '.join(detail)}")
    leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftover:
        raise VAELoadError(f"{where}: no weights for {leftover[0]}")
    return module


def load_diffusers_vae(
    path: str | Path,
    *,
    family: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DiffusersVAE:
    """Load a single-file ``.safetensors`` VAE or a diffusers folder (``config.json`` + weights)."""
    p = Path(path)
    if not p.exists():
        raise VAELoadError(f"{p}: no such file or folder")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise VAELoadError(
            f"{p}: pickle-based files are never loaded (they can run code); convert it to .safetensors"
        )
    config: dict[str, Any] | None = None
    meta: dict[str, str] = {}
    weights = p
    if p.is_dir():
        folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise VAELoadError(f"{p}: a diffusers VAE folder needs config.json")
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise VAELoadError(f"{cfg_path}: unreadable config ({exc})") from None
        found = [
            folder / n
            for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
        ]
        weights = next((f for f in found if f.is_file()), None)  # type: ignore[assignment]
        if weights is None:
            raise VAELoadError(
                f"{folder}: no diffusion_pytorch_model.safetensors (pickle .bin files are refused)"
            )
    elif p.suffix.lower() != ".safetensors":
        raise VAELoadError(f"{p}: not a .safetensors file")

    raw_state, meta = _read_safetensors(weights)
    try:
        state, naming = to_diffusers_naming(raw_state)
        arch = infer_architecture(state)
    except WeightsFormatError as exc:
        raise VAELoadError(f"{weights}: {exc}") from None
    fam, source = choose_family(family, arch["latent_channels"], config=config, meta=meta, path=p)
    full_config = dict(config) if config is not None else family_config(fam.name)
    full_config.update(arch)
    if config is None or full_config.get("scaling_factor") is None:
        full_config["scaling_factor"] = fam.scaling_factor
        full_config["shift_factor"] = fam.shift_factor or None

    module = _build_module(full_config, state, str(weights))
    dev = resolve_device(device)
    torch.nn.Module.to(module, device=dev, dtype=dtype or default_dtype(dev))
    log.debug("loaded %s (%s naming, family %s from %s)", p, naming, fam.name, source)
    return DiffusersVAE(module, fam, name=p.name, family_source=source, path=weights)
