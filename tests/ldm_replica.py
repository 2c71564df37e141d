"""A small replica of the webui's VAE module layouts, written for these tests: ldm/sgm
``AutoencoderKL`` (``encoder.down.0.block.0...``, ``quant_conv``) and the SD3 VAE (same names, no
quant convs, 16 channels). ldm/sgm code is not installable here; the replica has the same module
tree and parameter names, so the tiler meets the same layout it meets in the webui."""

from __future__ import annotations

import torch
from torch import nn


def nonlinearity(x: torch.Tensor) -> torch.Tensor:  # ldm's swish, a module-level function
    return x * torch.sigmoid(x)


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, sd3: bool = False) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = False
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.act = nn.SiLU(inplace=True) if sd3 else nonlinearity
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)
        elif sd3:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w = torch.bmm(q, k.reshape(b, c, hh * ww)) * (int(c) ** -0.5)
        w = torch.softmax(w, dim=2)
        h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.with_conv = True
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.with_conv = True
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class _Mid(nn.Module):
    def __init__(self, ch: int, sd3: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, sd3)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch, sd3)


class Encoder(nn.Module):
    def __init__(
        self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, sd3: bool
    ) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            m = nn.Module()
            block_in = ch * in_mult[level]
            m.block = nn.ModuleList()
            for _ in range(num_res_blocks):
                m.block.append(ResnetBlock(block_in, ch * mult, sd3))
                block_in = ch * mult
            m.attn = nn.ModuleList()
            if level != self.num_resolutions - 1:
                m.downsample = Downsample(block_in)
            self.down.append(m)
        self.mid = _Mid(block_in, sd3)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, 1, 1)
        self.act = nn.SiLU() if sd3 else nonlinearity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(self.act(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, sd3: bool
    ) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.give_pre_end = False
        self.tanh_out = False
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in, sd3)
        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            m = nn.Module()
            m.block = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                m.block.append(ResnetBlock(block_in, ch * ch_mult[level], sd3))
                block_in = ch * ch_mult[level]
            m.attn = nn.ModuleList()
            if level != 0:
                m.upsample = Upsample(block_in)
            self.up.insert(0, m)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)
        self.act = nn.SiLU() if sd3 else nonlinearity

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            for block in self.up[level].block:
                h = block(h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(self.act(self.norm_out(h)))


class ReplicaAutoencoderKL(nn.Module):
    """ldm/sgm ``AutoencoderKL`` (``sd3=False``) or SD3's ``SDVAE`` (``sd3=True``: no quant convs)."""

    def __init__(self, widths: tuple[int, ...], layers: int, z_channels: int, sd3: bool = False) -> None:
        super().__init__()
        ch = widths[0]
        mult = tuple(w // ch for w in widths)
        self.encoder = Encoder(ch, mult, layers, z_channels, sd3)
        self.decoder = Decoder(ch, mult, layers, z_channels, sd3)
        if not sd3:
            self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
            self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.sd3 = sd3

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return h if self.sd3 else self.quant_conv(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z if self.sd3 else self.post_quant_conv(z))


def replica_from(diffusers_vae: nn.Module, *, sd3: bool = False) -> ReplicaAutoencoderKL:
    """A replica holding the same weights as a diffusers AutoencoderKL (through our key mapping)."""
    from lib_vaebatch.backends.keys import diffusers_to_ldm

    cfg = diffusers_vae.config
    replica = ReplicaAutoencoderKL(
        tuple(cfg.block_out_channels), cfg.layers_per_block, cfg.latent_channels, sd3
    )
    state = diffusers_to_ldm(diffusers_vae.state_dict())
    replica.load_state_dict(state, strict=True)
    return replica.eval().requires_grad_(False)
