"""Accuracy of tiled decode/encode against untiled, and the planner's memory estimate.

Decoders: a tiny VAE briefly trained on structured pictures (as the fast-mode test uses), the same
tiny architecture randomly initialised, and the SD architecture randomly initialised. Latents:
encoded structured pictures (a dark half, a bright half, discs) and Gaussian noise.

    ./dev.sh py bench/bench_tiling_accuracy.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, sd_vae, write
from lib_vaebatch.tiling import decoder_program, encoder_program
from lib_vaebatch.tiling.exact import run_exact
from lib_vaebatch.tiling.fast import run_fast
from tests.support import psnr, structured_image, tiny_autoencoder, trained_autoencoder


def main() -> int:
    torch.set_grad_enabled(False)
    models = {
        "tiny, trained (100 steps)": trained_autoencoder(),
        "tiny, random init": tiny_autoencoder(4, layers_per_block=2, seed=1),
        "SD architecture, random init": sd_vae().module,
    }
    rows = []
    for name, vae in models.items():
        dec = decoder_program(vae.decoder, vae.post_quant_conv)
        enc = encoder_program(vae.encoder, vae.quant_conv)
        sizes = (256, 512) if name.startswith("tiny") else (256,)
        for size in sizes:
            for kind in ("structured", "noise"):
                for seed in (11, 12, 13):
                    if kind == "structured":
                        z = vae.encode(structured_image(size, size, seed)).latent_dist.mean
                    else:
                        gen = torch.Generator().manual_seed(seed)
                        z = torch.randn(1, 4, size // 8, size // 8, generator=gen)
                    ref = vae.decode(z).sample
                    exact = run_exact(dec, z, tile=8)
                    fast = run_fast(dec, z, tile=8)
                    rows.append({
                        "model": name, "op": "decode", "size": size, "latents": kind, "seed": seed,
                        "exact_max_abs": (exact - ref).abs().max().item(), "fast_psnr": psnr(fast, ref),
                    })  # fmt: skip
            x = structured_image(size, size, 21)
            ref = vae.quant_conv(vae.encoder(x))
            rows.append({
                "model": name, "op": "encode", "size": size, "latents": "structured", "seed": 21,
                "exact_max_abs": (run_exact(enc, x, tile=8) - ref).abs().max().item(),
                "fast_rel_err": ((run_fast(enc, x, tile=8) - ref).norm() / ref.norm()).item(),
            })  # fmt: skip
            print(rows[-1], flush=True)

    lines = ["Accuracy against untiled (fp32, CPU, tile 8 latent pixels).", "",
             "| model | op | size | input | exact: max abs diff | fast: PSNR dB (min–max) / rel. error |",
             "|---|---|---:|---|---:|---:|"]  # fmt: skip
    groups: dict[tuple[str, str, int, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["op"], r["size"], r["latents"]), []).append(r)
    for (model, op, size, kind), rs in groups.items():
        exact = max(r["exact_max_abs"] for r in rs)
        if op == "decode":
            p = [r["fast_psnr"] for r in rs]
            fast = f"{min(p):.1f}–{max(p):.1f}"
        else:
            fast = f"{max(r['fast_rel_err'] for r in rs):.2e}"
        lines.append(f"| {model} | {op} | {size}² | {kind} | {exact:.1e} | {fast} |")
    table = "\n".join(lines)
    payload = {"benchmark": "tiling-accuracy", "machine": machine(), "rows": rows}
    js, md = write("tiling-accuracy", payload, table)
    print(table)
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
