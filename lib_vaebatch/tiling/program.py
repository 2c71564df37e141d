"""A VAE encoder or decoder as a flat list of steps, read off the module itself.

Every step is ``out = (shortcut(skip) + conv(act(norm(src)))) / scale`` with an optional nearest 2x
upsample before the conv or a stride-2 conv, or a global single-head attention. The convs, norms and
projections are the module's own submodules and parameters, so a program built from a diffusers
``AutoencoderKL`` and one built from the webui's ldm/sgm ``AutoencoderKL`` or the SD3 VAE run the
same weights the same way. Building fails with :class:`TilingUnsupportedError` for anything the
executors do not reproduce exactly (attention inside up/down blocks, time embeddings, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import torch
from torch import nn

StepKind = Literal["conv", "up", "down", "attn"]


class TilingUnsupportedError(RuntimeError):
    """The module has a layout or feature the tiled executors do not handle."""


@dataclass(frozen=True, eq=False)
class Norm:
    """A GroupNorm's parameters (the statistics come from the tiles)."""

    groups: int
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def of(cls, module: nn.Module, where: str) -> Norm:
        if not isinstance(module, nn.GroupNorm):
            raise TilingUnsupportedError(f"{where}: expected a GroupNorm, found {type(module).__name__}")
        return cls(module.num_groups, float(module.eps), module.weight, module.bias)


@dataclass(frozen=True, eq=False)
class Attention:
    """Single- or multi-head self-attention over all positions, with a residual connection.

    ``q``, ``k``, ``v`` and ``out`` are Linear (diffusers) or 1x1 Conv2d (ldm/sgm/SD3) modules."""

    norm: Norm
    q: nn.Module
    k: nn.Module
    v: nn.Module
    out: nn.Module
    heads: int = 1
    rescale: float = 1.0


@dataclass(frozen=True, eq=False)
class Step:
    kind: StepKind
    src: int  # index of the value this step reads (0: the program's input; i+1: output of step i)
    name: str
    conv: nn.Conv2d | None = None
    norm: Norm | None = None
    act: bool = False
    skip: int | None = None
    shortcut: nn.Conv2d | None = None
    scale: float = 1.0
    attention: Attention | None = None

    @property
    def padding(self) -> int:
        assert self.conv is not None
        pad = self.conv.padding
        return int(pad[0]) if isinstance(pad, tuple) else int(pad)

    @property
    def out_channels(self) -> int:
        if self.kind == "attn":
            return -1  # same as the input
        assert self.conv is not None
        return int(self.conv.out_channels)


@dataclass
class Program:
    steps: list[Step]
    in_channels: int
    #: Resolution of every value (input first) relative to the input, e.g. 1, 2, 4, 8 for a decoder.
    scales: list[Fraction] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)
    kind: Literal["decoder", "encoder"] = "decoder"

    def __post_init__(self) -> None:
        scales = [Fraction(1)]
        channels = [self.in_channels]
        for i, step in enumerate(self.steps):
            if not 0 <= step.src <= i or (step.skip is not None and not 0 <= step.skip <= i):
                raise TilingUnsupportedError(f"{step.name}: reads a value that does not exist yet")
            s = scales[step.src]
            s = s * 2 if step.kind == "up" else s / 2 if step.kind == "down" else s
            if step.skip is not None and scales[step.skip] != s:
                raise TilingUnsupportedError(f"{step.name}: skip connection changes resolution")
            scales.append(s)
            channels.append(channels[step.src] if step.kind == "attn" else step.out_channels)
        self.scales, self.channels = scales, channels

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def factor(self, value: int) -> int:
        """Pixels of ``value`` per pixel of the lowest-resolution value (computed once: the
        executors ask for every tile of every step)."""
        factors = self.__dict__.get("_factors")
        if factors is None:
            low = min(self.scales)
            ratios = [sc / low for sc in self.scales]
            if any(r.denominator != 1 for r in ratios):
                raise TilingUnsupportedError("a value's resolution is not a whole multiple of the lowest")
            factors = self.__dict__["_factors"] = [int(r) for r in ratios]
        return factors[value]

    def last_use(self) -> list[int]:
        """For each value, the index of the last step that reads it (-1: never read)."""
        last = [-1] * (len(self.steps) + 1)
        for i, step in enumerate(self.steps):
            last[step.src] = i
            if step.skip is not None:
                last[step.skip] = i
        last[-1] = len(self.steps)  # the output
        return last

    def needs_stats(self) -> list[bool]:
        """For each value, whether a later step normalises it (so its statistics are collected)."""
        need = [False] * (len(self.steps) + 1)
        for step in self.steps:
            if step.norm is not None or step.kind == "attn":
                need[step.src] = True
        return need

    def modules(self) -> list[nn.Module]:
        out: list[nn.Module] = []
        for s in self.steps:
            out += [m for m in (s.conv, s.shortcut) if m is not None]
            if s.attention is not None:
                out += [s.attention.q, s.attention.k, s.attention.v, s.attention.out]
        return out


# -- checks ------------------------------------------------------------------------------------
def _conv(module: object, where: str, *, stride: int = 1) -> nn.Conv2d:
    if not isinstance(module, nn.Conv2d):
        raise TilingUnsupportedError(f"{where}: expected a Conv2d, found {type(module).__name__}")
    k = module.kernel_size
    pad = module.padding
    if (
        k[0] != k[1]
        or isinstance(pad, str)
        or pad[0] != pad[1]
        or module.stride != (stride, stride)
        or module.dilation != (1, 1)
        or module.groups != 1
        or module.padding_mode != "zeros"
    ):
        raise TilingUnsupportedError(f"{where}: unsupported convolution {module}")
    if stride == 1 and k[0] != 2 * pad[0] + 1:
        raise TilingUnsupportedError(f"{where}: convolution does not keep the size ({module})")
    if stride == 2 and (k[0] != 3 or pad[0] != 0):
        raise TilingUnsupportedError(f"{where}: unsupported downsampling convolution {module}")
    return module


def _silu(module: object, where: str) -> None:
    if (
        module is None
        or isinstance(module, nn.SiLU)
        or getattr(module, "__name__", "") in ("nonlinearity", "swish")
    ):
        return
    raise TilingUnsupportedError(f"{where}: unsupported activation {module!r}")


class _Builder:
    def __init__(self, in_channels: int) -> None:
        self.steps: list[Step] = []
        self.in_channels = in_channels

    @property
    def cur(self) -> int:
        return len(self.steps)

    def add(self, step: Step) -> int:
        self.steps.append(step)
        return len(self.steps)

    def conv(self, module: object, name: str, *, norm: Norm | None = None, act: bool = False) -> None:
        self.add(Step("conv", self.cur, name, conv=_conv(module, name), norm=norm, act=act))

    def resnet(
        self,
        name: str,
        norm1: object,
        conv1: object,
        norm2: object,
        conv2: object,
        shortcut: object,
        scale: float,
    ) -> None:
        x = self.cur
        self.add(
            Step(
                "conv",
                x,
                f"{name}.conv1",
                conv=_conv(conv1, f"{name}.conv1"),
                norm=Norm.of(norm1, name),
                act=True,
            )
        )
        sc = None if shortcut is None else _conv(shortcut, f"{name}.shortcut")
        self.add(
            Step(
                "conv",
                self.cur,
                f"{name}.conv2",
                conv=_conv(conv2, f"{name}.conv2"),
                norm=Norm.of(norm2, name),
                act=True,
                skip=x,
                shortcut=sc,
                scale=float(scale),
            )
        )

    def attention(self, name: str, attention: Attention) -> None:
        self.add(Step("attn", self.cur, name, attention=attention))

    def up(self, module: object, name: str) -> None:
        self.add(Step("up", self.cur, name, conv=_conv(module, name)))

    def down(self, module: object, name: str) -> None:
        self.add(Step("down", self.cur, name, conv=_conv(module, name, stride=2)))


# -- diffusers layout ----------------------------------------------------------------------------
def _diffusers_resnet(b: _Builder, r: nn.Module, name: str) -> None:
    if getattr(r, "upsample", None) is not None or getattr(r, "downsample", None) is not None:
        raise TilingUnsupportedError(f"{name}: resampling inside a resnet")
    # Without a projection, "default" and "group" are a plain GroupNorm (the VAE's case).
    if getattr(r, "time_emb_proj", None) is not None or getattr(r, "time_embedding_norm", "default") not in (
        "default",
        "group",
    ):
        raise TilingUnsupportedError(f"{name}: time embeddings")
    _silu(getattr(r, "nonlinearity", None), name)
    b.resnet(
        name,
        r.norm1,
        r.conv1,
        r.norm2,
        r.conv2,
        getattr(r, "conv_shortcut", None),
        getattr(r, "output_scale_factor", 1.0),
    )


def _diffusers_attention(a: nn.Module, name: str) -> Attention:
    if getattr(a, "spatial_norm", None) is not None or getattr(a, "norm_q", None) is not None:
        raise TilingUnsupportedError(f"{name}: attention with extra norms")
    if not getattr(a, "residual_connection", False) or a.group_norm is None:
        raise TilingUnsupportedError(f"{name}: attention without residual or group norm")
    return Attention(
        Norm.of(a.group_norm, name),
        a.to_q,
        a.to_k,
        a.to_v,
        a.to_out[0],
        int(a.heads),
        float(a.rescale_output_factor),
    )


def _diffusers_mid(b: _Builder, mid: nn.Module, name: str) -> None:
    resnets = list(mid.resnets)
    attentions = list(getattr(mid, "attentions", []))
    _diffusers_resnet(b, resnets[0], f"{name}.resnets.0")
    for i, (attn, res) in enumerate(zip(attentions, resnets[1:], strict=True)):
        if attn is not None:
            b.attention(f"{name}.attentions.{i}", _diffusers_attention(attn, f"{name}.attentions.{i}"))
        _diffusers_resnet(b, res, f"{name}.resnets.{i + 1}")


def _diffusers_decoder(decoder: nn.Module, post_quant_conv: nn.Module | None) -> Program:
    b = _Builder(int((post_quant_conv or decoder.conv_in).in_channels))
    if post_quant_conv is not None:
        b.conv(post_quant_conv, "post_quant_conv")
    b.conv(decoder.conv_in, "decoder.conv_in")
    _diffusers_mid(b, decoder.mid_block, "decoder.mid_block")
    for i, block in enumerate(decoder.up_blocks):
        if getattr(block, "attentions", None):
            raise TilingUnsupportedError(f"decoder.up_blocks.{i}: attention in an up block")
        for j, res in enumerate(block.resnets):
            _diffusers_resnet(b, res, f"decoder.up_blocks.{i}.resnets.{j}")
        for k, up in enumerate(block.upsamplers or []):
            where = f"decoder.up_blocks.{i}.upsamplers.{k}"
            if (
                getattr(up, "use_conv_transpose", False)
                or getattr(up, "norm", None) is not None
                or not up.use_conv
            ):
                raise TilingUnsupportedError(f"{where}: unsupported upsampler")
            b.up(getattr(up, "conv", None) or up.Conv2d_0, where)
    _silu(decoder.conv_act, "decoder.conv_act")
    b.conv(
        decoder.conv_out,
        "decoder.conv_out",
        norm=Norm.of(decoder.conv_norm_out, "decoder.conv_norm_out"),
        act=True,
    )
    return Program(b.steps, b.in_channels, kind="decoder")


def _diffusers_encoder(encoder: nn.Module, quant_conv: nn.Module | None) -> Program:
    b = _Builder(int(encoder.conv_in.in_channels))
    b.conv(encoder.conv_in, "encoder.conv_in")
    for i, block in enumerate(encoder.down_blocks):
        if getattr(block, "attentions", None):
            raise TilingUnsupportedError(f"encoder.down_blocks.{i}: attention in a down block")
        for j, res in enumerate(block.resnets):
            _diffusers_resnet(b, res, f"encoder.down_blocks.{i}.resnets.{j}")
        for k, down in enumerate(block.downsamplers or []):
            where = f"encoder.down_blocks.{i}.downsamplers.{k}"
            if not down.use_conv or getattr(down, "norm", None) is not None or down.padding != 0:
                raise TilingUnsupportedError(f"{where}: unsupported downsampler")
            b.down(down.conv, where)
    _diffusers_mid(b, encoder.mid_block, "encoder.mid_block")
    _silu(encoder.conv_act, "encoder.conv_act")
    b.conv(
        encoder.conv_out,
        "encoder.conv_out",
        norm=Norm.of(encoder.conv_norm_out, "encoder.conv_norm_out"),
        act=True,
    )
    if quant_conv is not None:
        b.conv(quant_conv, "quant_conv")
    return Program(b.steps, b.in_channels, kind="encoder")


# -- ldm / sgm / SD3 layout (the webui's first_stage_model) ----------------------------------
def _ldm_resnet(b: _Builder, r: nn.Module, name: str) -> None:
    if getattr(r, "temb_proj", None) is not None:
        raise TilingUnsupportedError(f"{name}: time embeddings")
    shortcut = None
    if getattr(r, "in_channels", None) != getattr(r, "out_channels", None):
        shortcut = getattr(r, "nin_shortcut", None) if not getattr(r, "use_conv_shortcut", False) else None
        shortcut = shortcut if shortcut is not None else getattr(r, "conv_shortcut", None)
        if shortcut is None:
            raise TilingUnsupportedError(f"{name}: channel change without a shortcut conv")
    b.resnet(name, r.norm1, r.conv1, r.norm2, r.conv2, shortcut, 1.0)


def _ldm_attention(a: nn.Module, name: str) -> Attention:
    for part in ("norm", "q", "k", "v", "proj_out"):
        if not hasattr(a, part):
            raise TilingUnsupportedError(f"{name}: unknown attention block ({type(a).__name__})")
    return Attention(Norm.of(a.norm, name), a.q, a.k, a.v, a.proj_out)


def _ldm_mid(b: _Builder, mid: nn.Module, name: str) -> None:
    _ldm_resnet(b, mid.block_1, f"{name}.block_1")
    b.attention(f"{name}.attn_1", _ldm_attention(mid.attn_1, f"{name}.attn_1"))
    _ldm_resnet(b, mid.block_2, f"{name}.block_2")


def _no_level_attention(level: nn.Module, name: str) -> None:
    if len(getattr(level, "attn", [])):
        raise TilingUnsupportedError(f"{name}: attention inside a resolution level")


def _ldm_decoder(decoder: nn.Module, post_quant_conv: nn.Module | None) -> Program:
    if getattr(decoder, "give_pre_end", False) or getattr(decoder, "tanh_out", False):
        raise TilingUnsupportedError("decoder: give_pre_end/tanh_out are not supported")
    b = _Builder(int((post_quant_conv or decoder.conv_in).in_channels))
    if post_quant_conv is not None:
        b.conv(post_quant_conv, "post_quant_conv")
    b.conv(decoder.conv_in, "decoder.conv_in")
    _ldm_mid(b, decoder.mid, "decoder.mid")
    for level in reversed(range(len(decoder.up))):
        up = decoder.up[level]
        _no_level_attention(up, f"decoder.up.{level}")
        for j, res in enumerate(up.block):
            _ldm_resnet(b, res, f"decoder.up.{level}.block.{j}")
        upsample = getattr(up, "upsample", None)
        if upsample is not None:
            if getattr(upsample, "with_conv", True) is False or not hasattr(upsample, "conv"):
                raise TilingUnsupportedError(f"decoder.up.{level}.upsample: upsampling without a conv")
            b.up(upsample.conv, f"decoder.up.{level}.upsample.conv")
    b.conv(decoder.conv_out, "decoder.conv_out", norm=Norm.of(decoder.norm_out, "decoder.norm_out"), act=True)
    return Program(b.steps, b.in_channels, kind="decoder")


def _ldm_encoder(encoder: nn.Module, quant_conv: nn.Module | None) -> Program:
    b = _Builder(int(encoder.conv_in.in_channels))
    b.conv(encoder.conv_in, "encoder.conv_in")
    for level, down in enumerate(encoder.down):
        _no_level_attention(down, f"encoder.down.{level}")
        for j, res in enumerate(down.block):
            _ldm_resnet(b, res, f"encoder.down.{level}.block.{j}")
        downsample = getattr(down, "downsample", None)
        if downsample is not None:
            if getattr(downsample, "with_conv", True) is False or not hasattr(downsample, "conv"):
                raise TilingUnsupportedError(f"encoder.down.{level}.downsample: pooling is not supported")
            b.down(downsample.conv, f"encoder.down.{level}.downsample.conv")
    _ldm_mid(b, encoder.mid, "encoder.mid")
    b.conv(encoder.conv_out, "encoder.conv_out", norm=Norm.of(encoder.norm_out, "encoder.norm_out"), act=True)
    if quant_conv is not None:
        b.conv(quant_conv, "quant_conv")
    return Program(b.steps, b.in_channels, kind="encoder")


# -- entry points ------------------------------------------------------------------------------
def decoder_program(decoder: nn.Module, post_quant_conv: nn.Module | None = None) -> Program:
    """Program of a decoder in diffusers (``up_blocks``) or ldm/sgm/SD3 (``up``) layout."""
    try:
        if hasattr(decoder, "up_blocks") and hasattr(decoder, "mid_block"):
            return _diffusers_decoder(decoder, post_quant_conv)
        if hasattr(decoder, "up") and hasattr(decoder, "mid"):
            return _ldm_decoder(decoder, post_quant_conv)
    except (AttributeError, TypeError, ValueError) as exc:
        raise TilingUnsupportedError(f"decoder: {exc}") from None
    raise TilingUnsupportedError(f"unknown decoder layout {type(decoder).__name__}")


def encoder_program(encoder: nn.Module, quant_conv: nn.Module | None = None) -> Program:
    """Program of an encoder in diffusers (``down_blocks``) or ldm/sgm/SD3 (``down``) layout."""
    try:
        if hasattr(encoder, "down_blocks") and hasattr(encoder, "mid_block"):
            return _diffusers_encoder(encoder, quant_conv)
        if hasattr(encoder, "down") and hasattr(encoder, "mid"):
            return _ldm_encoder(encoder, quant_conv)
    except (AttributeError, TypeError, ValueError) as exc:
        raise TilingUnsupportedError(f"encoder: {exc}") from None
    raise TilingUnsupportedError(f"unknown encoder layout {type(encoder).__name__}")
