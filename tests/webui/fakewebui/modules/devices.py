"""devices (reference §1.9, §1.10; test_for_nans checks only the first element)."""

from __future__ import annotations

import contextlib

import torch

from modules import shared

cpu = torch.device("cpu")
device = torch.device("cpu")
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
unet_needs_upcast = False


class NansException(Exception):
    pass


def test_for_nans(x, where):
    if shared.cmd_opts.disable_nan_check:
        return
    if not torch.isnan(x[(0,) * len(x.shape)]):
        return
    if where == "unet":
        message = "A tensor with NaNs was produced in Unet."
    elif where == "vae":
        message = "A tensor with NaNs was produced in VAE."
    else:
        message = "A tensor with NaNs was produced."
    message += " Use --disable-nan-check commandline argument to disable this check."
    raise NansException(message)


def autocast(disable=False):
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    pass
