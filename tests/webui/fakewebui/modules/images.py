"""images.save_image (reference §4.1, §4.3, §4.4) — a faithful subset: the signature and return
value, folder creation, decoration ``""`` when seed is None else ``opts.samples_filename_pattern or
"[seed]-[prompt_spaces]"`` (only [seed] and [prompt_spaces] are resolved here), the NNNNN-
sequence prefix, the PNG ``parameters`` chunk, ``already_saved_as``. Every call is recorded."""

from __future__ import annotations

import contextlib
import os

from PIL import PngImagePlugin

saved_calls: list[dict] = []


def get_next_sequence_number(path, basename):
    result = -1
    for f in os.listdir(path):
        if f.startswith(f"{basename}-" if basename else ""):
            with contextlib.suppress(ValueError):
                result = max(int(f[len(basename) :].lstrip("-").split("-")[0].split(".")[0]), result)
    return result + 1


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None,
               short_filename=False, no_prompt=False, grid=False, pnginfo_section_name="parameters",
               p=None, existing_info=None, forced_filename=None, suffix="", save_to_dirs=None):  # fmt: skip
    from modules import shared

    saved_calls.append(
        {"path": path, "seed": seed, "prompt": prompt, "extension": extension, "info": info, "p": p}
    )
    os.makedirs(path, exist_ok=True)
    if short_filename or seed is None:
        decoration = ""
    else:
        decoration = shared.opts.data.get("samples_filename_pattern") or "[seed]-[prompt_spaces]"
        decoration = decoration.replace("[seed]", str(seed)).replace("[prompt_spaces]", prompt or "")
    n = get_next_sequence_number(path, basename)
    fullfn = os.path.join(path, f"{n:05}-{decoration}.{extension}" if decoration else f"{n:05}.{extension}")
    if extension == "png":
        pnginfo = PngImagePlugin.PngInfo()
        if info is not None:
            pnginfo.add_text(pnginfo_section_name, info)
        image.save(fullfn, pnginfo=pnginfo)
    else:
        image.convert("RGB").save(fullfn)
    image.already_saved_as = fullfn
    return fullfn, None
