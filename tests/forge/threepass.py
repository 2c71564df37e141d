"""ComfyUI's "3-pass" tiled decode as Forge copies it (reference §1.1 "Tiled fallback"), written
here for the fake hosts: three passes of independent overlapping tiles (tall, wide, square),
linearly feathered, blended and averaged. Approximate by design (it is what the engine avoids)."""

from __future__ import annotations

import torch

#: True while a 3-pass decode runs (lets a test make only Forge's tiles fit).
ACTIVE = False
#: Every 3-pass decode's output, in order (test instrumentation: what Forge's tiles produced).
OUTPUTS: list[torch.Tensor] = []


def _tiled_pass(samples, fn, tile_h, tile_w, overlap, scale):
    """Independent overlapping tiles, linearly feathered and blended (one pass)."""
    b, _, h, w = samples.shape
    out = torch.zeros((b, 3, h * scale, w * scale))
    weight = torch.zeros_like(out)
    step_y, step_x = max(1, tile_h - overlap), max(1, tile_w - overlap)
    for y in range(0, h, step_y):
        for x in range(0, w, step_x):
            y0, x0 = max(0, min(y, h - tile_h)), max(0, min(x, w - tile_w))
            part = fn(samples[:, :, y0 : y0 + tile_h, x0 : x0 + tile_w]).float().cpu()
            ph, pw = part.shape[-2:]
            mask = torch.ones((1, 1, ph, pw))
            feather = overlap * scale
            for t in range(min(feather, ph // 2, pw // 2)):
                f = (t + 1) / (feather + 1)
                mask[..., t, :] *= f
                mask[..., ph - 1 - t, :] *= f
                mask[..., :, t] *= f
                mask[..., :, pw - 1 - t] *= f
            out[..., y0 * scale : y0 * scale + ph, x0 * scale : x0 * scale + pw] += part * mask
            weight[..., y0 * scale : y0 * scale + ph, x0 * scale : x0 * scale + pw] += mask
    return out / weight.clamp_min(1e-8)


def three_pass(samples, fn, ratio, tile_x=64, tile_y=64, overlap=16):
    """``fn(latent tile) + 1`` → pixels in [0, 2]; returns NCHW in [0, 1]."""
    global ACTIVE
    ACTIVE = True
    try:
        total = (
            _tiled_pass(samples, fn, tile_y * 2, tile_x // 2, overlap, ratio)
            + _tiled_pass(samples, fn, tile_y // 2, tile_x * 2, overlap, ratio)
            + _tiled_pass(samples, fn, tile_y, tile_x, overlap, ratio)
        )
    finally:
        ACTIVE = False
    out = torch.clamp(total / 3.0 / 2.0, 0.0, 1.0)
    OUTPUTS.append(out.clone())
    return out
