"""lowvram (reference §1.11): the VAE stays on the CPU; encode/decode are replaced by instance
attributes that move it to the device first; module_in_gpu tracks the resident module."""

from __future__ import annotations

import torch

from modules import devices

module_in_gpu = None
cpu = torch.device("cpu")
moves: list[str] = []  # test instrumentation


def send_everything_to_cpu():
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to(cpu)
    module_in_gpu = None


def setup_for_low_vram(sd_model):
    sd_model.lowvram = True
    fsm = sd_model.first_stage_model
    encode, decode = fsm.encode, fsm.decode

    def send_me_to_gpu(module):
        global module_in_gpu
        if module_in_gpu is module:
            return
        if module_in_gpu is not None:
            module_in_gpu.to(cpu)
        module.to(devices.device)
        module_in_gpu = module
        moves.append(type(module).__name__)

    def encode_wrap(x):
        send_me_to_gpu(fsm)
        return encode(x)

    def decode_wrap(z):
        send_me_to_gpu(fsm)
        return decode(z)

    fsm.encode, fsm.decode = encode_wrap, decode_wrap


def is_enabled(sd_model):
    return sd_model.lowvram
