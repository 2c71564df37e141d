"""Model families: latent channels, scaling constants and preview (latent-to-RGB) factors.

Latents "in the sampler's space" (what the webui's samplers produce, and what our latents files hold
by default) relate to the VAE's raw latent space by ``scaled = (raw - shift) * scaling``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    """Constants of one model family's VAE."""

    name: str
    label: str
    latent_channels: int
    scaling_factor: float
    shift_factor: float
    # Rows are latent channels, columns R, G, B; applied to latents in the sampler's space.
    rgb_factors: tuple[tuple[float, float, float], ...]
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


_SD_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", "Stable Diffusion 1.x", 4, 0.18215, 0.0, _SD_RGB),
        Family("sd2", "Stable Diffusion 2.x", 4, 0.18215, 0.0, _SD_RGB),
        Family(
            "sdxl",
            "Stable Diffusion XL",
            4,
            0.13025,
            0.0,
            (
                (0.3651, 0.4232, 0.4341),
                (-0.2533, -0.0042, 0.1068),
                (0.1076, 0.1111, -0.0362),
                (-0.3165, -0.2492, -0.2188),
            ),
            (0.1084, -0.0175, -0.0011),
        ),
        Family(
            "sd3",
            "Stable Diffusion 3",
            16,
            1.5305,
            0.0609,
            (
                (-0.0922, -0.0175, 0.0749),
                (0.0311, 0.0633, 0.0954),
                (0.1994, 0.0927, 0.0458),
                (0.0856, 0.0339, 0.0902),
                (0.0587, 0.0272, -0.0496),
                (-0.0006, 0.1104, 0.0309),
                (0.0978, 0.0306, 0.0427),
                (-0.0042, 0.1038, 0.1358),
                (-0.0194, 0.0020, 0.0669),
                (-0.0488, 0.0130, -0.0268),
                (0.0922, 0.0988, 0.0951),
                (-0.0278, 0.0524, -0.0542),
                (0.0332, 0.0456, 0.0895),
                (-0.0069, -0.0030, -0.0810),
                (-0.0596, -0.0465, -0.0293),
                (-0.1448, -0.1463, -0.1189),
            ),
            (0.2394, 0.2135, 0.1925),
        ),
        Family(
            "flux",
            "Flux.1",
            16,
            0.3611,
            0.1159,
            (
                (-0.0346, 0.0244, 0.0681),
                (0.0034, 0.0210, 0.0687),
                (0.0275, -0.0668, -0.0433),
                (-0.0174, 0.0160, 0.0617),
                (0.0859, 0.0721, 0.0329),
                (0.0004, 0.0383, 0.0115),
                (0.0405, 0.0861, 0.0915),
                (-0.0236, -0.0185, -0.0259),
                (-0.0245, 0.0250, 0.1180),
                (0.1008, 0.0755, -0.0421),
                (-0.0515, 0.0201, 0.0011),
                (0.0428, -0.0012, -0.0036),
                (0.0817, 0.0765, 0.0749),
                (-0.1264, -0.0522, -0.1103),
                (-0.0280, -0.0881, -0.0499),
                (-0.1262, -0.0982, -0.0778),
            ),
            (-0.0329, -0.0718, -0.0851),
        ),
    )
}

FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def get_family(name: str) -> Family:
    """Look a family up by name (case-insensitive); the error lists the known names."""
    key = name.strip().lower()
    try:
        return FAMILIES[key]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILY_NAMES)}") from None


#: The latent channel counts some family has ("4 or 16").
KNOWN_CHANNELS = " or ".join(str(c) for c in sorted({f.latent_channels for f in FAMILIES.values()}))


def default_family_for_channels(channels: int) -> Family:
    """The family assumed when nothing else says: 4 channels -> sd1, 16 -> flux."""
    if channels == 4:
        return FAMILIES["sd1"]
    if channels == 16:
        return FAMILIES["flux"]
    raise ValueError(f"no model family has {channels} latent channels (known: {KNOWN_CHANNELS})")


def no_family_problem(channels: int) -> str:
    """The one-line problem of latents whose channel count no model family has."""
    have = f"{channels} channel" + ("" if channels == 1 else "s")
    return f"latents have {have}; no model family has {channels} (known: {KNOWN_CHANNELS})"


def family_for_scaling(scaling_factor: float, channels: int | None = None) -> Family | None:
    """The family whose scaling factor matches (used for diffusers folders' config.json)."""
    for fam in FAMILIES.values():
        if fam.name == "sd2":
            continue  # same constant as sd1; sd1 is the name we report
        if abs(fam.scaling_factor - scaling_factor) < 1e-6 and channels in (None, fam.latent_channels):
            return fam
    return None


def to_raw(latents: torch.Tensor, scaling_factor: float, shift_factor: float) -> torch.Tensor:
    """Sampler-space latents to the VAE's raw space: ``1/scaling * z + shift``.

    Written as ldm/sgm's ``decode_first_stage`` writes it (a multiplication by the reciprocal, in
    the tensor's dtype) so that our decodes are bit-identical to the webui's own."""
    out = 1.0 / scaling_factor * latents
    return out + shift_factor if shift_factor else out


def to_scaled(raw: torch.Tensor, scaling_factor: float, shift_factor: float) -> torch.Tensor:
    """The VAE's raw latents to the sampler's space: ``(z - shift) * scaling``."""
    return (raw - shift_factor) * scaling_factor if shift_factor else raw * scaling_factor
