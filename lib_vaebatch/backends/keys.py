"""State-dict key naming of AutoencoderKL weights: ldm/sgm ("webui") naming and diffusers naming.

Single-file VAEs come in two namings. The ldm/sgm one (``encoder.down.0.block.1.nin_shortcut``,
``decoder.up.3.upsample.conv``, ``mid.attn_1.q`` as 1x1 convs) is what the webui loads and what most
``*.vae.safetensors`` files use; the diffusers one (``encoder.down_blocks.0.resnets.1.conv_shortcut``,
``decoder.up_blocks.0.upsamplers.0.conv``, ``mid_block.attentions.0.to_q`` as linears) is what
diffusers saves. The decoder's up blocks are numbered in opposite orders in the two.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

import torch

Naming = Literal["ldm", "diffusers"]

# Prefixes under which a VAE sits inside a larger file (a whole SD checkpoint, a pipeline dump).
_CONTAINER_PREFIXES = ("first_stage_model.", "vae.")

_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFFUSERS.items()}
# diffusers before 0.14 named the attention projections differently.
_ATTN_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class WeightsFormatError(ValueError):
    """The weights are not an AutoencoderKL in a naming we know."""


_VAE_TOP_LEVEL = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def vae_key_map(names: Iterable[str]) -> dict[str, str]:
    """VAE key -> key in the file: strips a container prefix (``first_stage_model.``...) and keeps
    only the VAE's own entries (a whole checkpoint's UNet, ``loss.*``, EMA copies are left out)."""
    names = list(names)
    prefix = next(
        (
            p
            for p in _CONTAINER_PREFIXES
            if any(n.startswith((p + "encoder.", p + "decoder.")) for n in names)
        ),
        "",
    )
    return {
        n[len(prefix) :]: n
        for n in names
        if n.startswith(prefix) and n[len(prefix) :].startswith(_VAE_TOP_LEVEL)
    }


def extract_vae(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE's own entries of a state dict, container prefix stripped."""
    return {k: state[n] for k, n in vae_key_map(state).items()}


def detect_naming(keys: Mapping[str, object] | list[str]) -> Naming:
    """Which naming a VAE state dict uses; a clear error when it is neither."""
    names = list(keys)
    if any(re.match(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.", k) for k in names):
        return "diffusers"
    if any(re.match(r"(encoder|decoder)\.(down|up|mid)\.", k) for k in names):
        return "ldm"
    sample = ", ".join(sorted(names)[:5]) or "no tensors"
    raise WeightsFormatError(f"no AutoencoderKL encoder/decoder weights found (first keys: {sample})")


def _num_up_blocks(keys: list[str], pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def _to_linear(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


def _to_conv(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], 1, 1) if t.ndim == 2 else t


def ldm_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ldm/sgm VAE keys to diffusers keys (attention 1x1 convs become linear weights)."""
    keys = list(state)
    n_up = _num_up_blocks(keys, r"decoder\.up\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = key
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", new)
        new = re.sub(
            r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv.", new
        )
        new = re.sub(
            r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
            lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.resnets.{m.group(2)}.",
            new,
        )
        new = re.sub(
            r"^decoder\.up\.(\d+)\.upsample\.conv\.",
            lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.conv.",
            new,
        )
        new = re.sub(
            r"^(encoder|decoder)\.mid\.block_(\d)\.",
            lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.",
            new,
        )
        attn = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", new)
        if attn:
            side, part, kind = attn.groups()
            new = f"{side}.mid_block.attentions.0.{_ATTN_LDM_TO_DIFFUSERS[part]}.{kind}"
            if part != "norm":
                tensor = _to_linear(tensor)
        new = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", new)
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        out[new] = tensor
    return out


def normalize_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map legacy diffusers attention names (query/key/value/proj_attn) to current ones."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = re.match(
            r"^(encoder|decoder)\.mid_block\.attentions\.0\.(query|key|value|proj_attn)\.(weight|bias)$", key
        )
        if m:
            side, part, kind = m.groups()
            out[f"{side}.mid_block.attentions.0.{_ATTN_LEGACY[part]}.{kind}"] = _to_linear(tensor)
        else:
            out[key] = tensor
    return out


def diffusers_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers VAE keys to ldm/sgm keys (the inverse of :func:`ldm_to_diffusers`)."""
    keys = list(state)
    n_up = _num_up_blocks(keys, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = key
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(
            r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv.", new
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.",
            new,
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
            lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.",
            new,
        )
        new = re.sub(
            r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.",
            lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.",
            new,
        )
        attn = re.match(
            r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$",
            new,
        )
        if attn:
            side, part, kind = attn.groups()
            new = f"{side}.mid.attn_1.{_ATTN_DIFFUSERS_TO_LDM[part]}.{kind}"
            if part != "group_norm":
                tensor = _to_conv(tensor)
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[new] = tensor
    return out


def to_diffusers_naming(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Naming]:
    """Any supported single-file VAE state dict to diffusers naming; also says what it was."""
    vae = extract_vae(state)
    naming = detect_naming(vae)
    if naming == "ldm":
        return ldm_to_diffusers(vae), naming
    return normalize_diffusers(vae), naming
