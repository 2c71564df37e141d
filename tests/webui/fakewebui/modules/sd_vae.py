"""sd_vae (reference §1.x, sd_vae.py:13, :72, :188): vae_dict (name -> file), refresh_vae_list,
load_vae_dict (read_state_dict minus ``loss*`` keys). ``vae_path`` is where the test puts files."""

from __future__ import annotations

import os

vae_path = ""
vae_dict: dict[str, str] = {}
vae_ignore_keys = {"model_ema.decay", "model_ema.num_updates"}


def refresh_vae_list():
    vae_dict.clear()
    if vae_path and os.path.isdir(vae_path):
        for f in sorted(os.listdir(vae_path)):
            if f.endswith((".safetensors", ".pt", ".ckpt")):
                vae_dict[f] = os.path.join(vae_path, f)


def load_vae_dict(filename, map_location):
    from safetensors.torch import load_file

    vae_ckpt = load_file(filename, device=str(map_location))
    return {k: v for k, v in vae_ckpt.items() if k[0:4] != "loss" and k not in vae_ignore_keys}
