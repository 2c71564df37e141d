"""shared: opts, cmd_opts, state, sd_model, device (reference §1.9, §3, §4.7)."""

from __future__ import annotations

import argparse

import torch

from modules.options import OptionInfo, Options  # noqa: F401  (shared.OptionInfo is how extensions reach it)
from modules.shared_state import State

DEFAULT_OPTS = {
    "auto_vae_precision": True,
    "auto_vae_precision_bfloat16": False,
    "sd_vae_decode_method": "Full",
    "sd_vae_encode_method": "Full",
    "samples_format": "png",
    "enable_pnginfo": True,
}


def fresh_cmd_opts() -> argparse.Namespace:
    return argparse.Namespace(
        disable_nan_check=False, no_half=False, no_half_vae=False, lowvram=False, medvram=False,
        medvram_sdxl=False, upcast_sampling=False, api_auth=None, hide_ui_dir_config=False, port=None, server_name=None,
    )  # fmt: skip


opts = Options(DEFAULT_OPTS)
cmd_opts = fresh_cmd_opts()
state = State()
sd_model = None
device = torch.device("cpu")


def reset() -> None:
    """Test helper: a freshly started webui."""
    global opts, cmd_opts, state, sd_model
    opts = Options(DEFAULT_OPTS)
    cmd_opts = fresh_cmd_opts()
    state = State()
    sd_model = None
