"""``python -m lib_vaebatch demo``: the whole round trip on the built-in default, no downloads.

Draws a few sample images (mixed sizes, one with transparency), encodes them into latents files
(one per size), decodes those back, saves the images with embedded metadata, reads the metadata
back, and prints a summary with the round trip's PSNR.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lib_vaebatch import infotext
from lib_vaebatch.backends import ApproxVAE
from lib_vaebatch.engine.encode import EncodeOptions
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.jobs import decode_to_folder, encode_to_files, load_latent_files
from lib_vaebatch.log import PREFIX
from lib_vaebatch.naming import next_sequence_number
from lib_vaebatch.progress import ConsoleProgress
from lib_vaebatch.saving import read_infotext


def _gradient(w: int, h: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    rgb = (1 - t) * np.array(top) + t * np.array(bottom)
    return Image.fromarray(np.broadcast_to(rgb, (h, w, 3)).astype(np.uint8), "RGB")


def sample_images() -> list[tuple[str, str, Image.Image]]:
    """(file name, description, image): deterministic, drawn here, mixed sizes."""
    images: list[tuple[str, str, Image.Image]] = []

    img = _gradient(512, 512, (30, 60, 140), (240, 170, 90))
    d = ImageDraw.Draw(img)
    for i in range(5):
        r = 40 + 18 * i
        d.ellipse(
            (80 + 70 * i - r // 2, 250 - r // 2, 80 + 70 * i + r // 2, 250 + r // 2),
            fill=(250 - 40 * i, 60 + 35 * i, 90 + 30 * i),
        )
    images.append(("circles.png", "circles on a dusk gradient", img))

    bars = Image.new("RGB", (512, 512))
    d = ImageDraw.Draw(bars)
    colours = [
        (192, 192, 192),
        (192, 192, 0),
        (0, 192, 192),
        (0, 192, 0),
        (192, 0, 192),
        (192, 0, 0),
        (0, 0, 192),
    ]
    for i, c in enumerate(colours):
        d.rectangle((i * 512 // 7, 0, (i + 1) * 512 // 7, 360), fill=c)
    for x in range(0, 512, 16):
        d.rectangle((x, 380, x + 7, 512), fill=(255, 255, 255))
    images.append(("bars.png", "colour bars and a fine stripe pattern", bars))

    land = _gradient(640, 384, (110, 170, 230), (230, 240, 250))
    d = ImageDraw.Draw(land)
    d.ellipse((470, 50, 560, 140), fill=(255, 220, 120))
    d.polygon(
        [(0, 300), (160, 180), (330, 290), (470, 200), (640, 300), (640, 384), (0, 384)], fill=(60, 120, 70)
    )
    images.append(("landscape.png", "a landscape, 640x384", land))

    port = _gradient(384, 640, (250, 235, 215), (120, 90, 140))
    d = ImageDraw.Draw(port)
    d.rectangle((120, 200, 264, 520), fill=(60, 40, 30))
    d.ellipse((132, 80, 252, 200), fill=(230, 190, 160))
    images.append(("portrait.png", "a portrait shape, 384x640", port))

    logo = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    d = ImageDraw.Draw(logo)
    d.ellipse((96, 96, 416, 416), fill=(220, 40, 60, 255))
    d.rectangle((200, 60, 312, 452), fill=(40, 90, 220, 200))
    images.append(("transparent.png", "shapes on transparency (composited on white)", logo))
    return images


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run_demo(out: Path, *, family: str = "sd1", progress: bool = True) -> int:
    start = time.perf_counter()
    inputs, latents_dir, images_dir = out / "inputs", out / "latents", out / "images"
    inputs.mkdir(parents=True, exist_ok=True)
    samples = sample_images()
    paths: list[Path] = []
    for name, _desc, img in samples:
        path = inputs / name
        if not path.exists():  # deterministic content: an existing copy is the same picture
            img.save(path)
        paths.append(path)
    params = [
        infotext.Infotext(
            f"VAE Batch demo: {desc}",
            "",
            {"Seed": str(i), "Size": f"{img.width}x{img.height}", "Demo image": name},
        ).text()
        for i, (name, desc, img) in enumerate(samples)
    ]

    vae = ApproxVAE(family)
    print(
        f"{PREFIX} demo with the built-in approximate VAE ({vae.family.label}): preview quality, no downloads"
    )
    options = EngineOptions()
    target = latents_dir / f"{next_sequence_number(latents_dir):05}-demo.safetensors"
    bar = ConsoleProgress("encode", enabled=progress)
    enc = encode_to_files(
        vae, paths, target, encode_options=EncodeOptions(), options=options, parameters=params, progress=bar
    )
    bar.close()
    batches, errors = load_latent_files(enc.written, vae.latent_channels)
    if errors:
        for e in errors:
            print(f"{PREFIX} error: {e}")
        return 1
    bar = ConsoleProgress("decode", enabled=progress)
    dec = decode_to_folder(
        batches, images_dir, lambda fam: vae, options=options, pattern="[source]", progress=bar
    )
    bar.close()

    by_source = {p.name: p for p in paths}
    print(f"\n{'image':<18} {'size':>9}  {'PSNR':>7}  metadata  saved as")
    for f in dec.files:
        for saved in f.saved:
            src = by_source[(f.batch.sources or [""])[saved.index]]
            decoded = np.asarray(Image.open(saved.path).convert("RGB"))
            original = Image.open(src)
            original = Image.alpha_composite(
                Image.new("RGBA", original.size, (255, 255, 255, 255)), original.convert("RGBA")
            ).convert("RGB")
            ow, oh = original.size
            w, h = decoded.shape[1], decoded.shape[0]
            left, top = (ow - w) // 2, (oh - h) // 2
            ref = np.asarray(original.crop((left, top, left + w, top + h)))
            meta = read_infotext(saved.path) or ""
            has_meta = "yes" if infotext.parse(meta).params.get("VAE Batch") else "NO"
            print(f"{src.name:<18} {w:>4}x{h:<4}  {psnr(decoded, ref):6.1f}dB  {has_meta:<8}  {saved.path}")
    n_saved = len(dec.saved)
    print(
        f"\n{PREFIX} {len(paths)} images -> {len(enc.written)} latents file(s) in {latents_dir} -> "
        f"{n_saved} images with metadata in {images_dir} ({time.perf_counter() - start:.1f} s)"
    )
    print(f"{PREFIX} approximate VAE = preview quality; encode/decode with --vae PATH use a real VAE")
    return 0 if dec.ok and n_saved == len(paths) else 1
