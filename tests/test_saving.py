from __future__ import annotations

import pytest
from PIL import Image

from lib_vaebatch.saving import read_infotext, save_image

TEXT = 'a fox "quoted", ünïcödé 狐\nNegative prompt: x\nSteps: 1, Seed: 2, Size: 8x8, VAE Batch: on'


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp"])
def test_metadata_round_trips_in_every_format(tmp_path, fmt):
    img = Image.new("RGB", (16, 8), (10, 20, 30))
    path = save_image(img, tmp_path, "pic", fmt=fmt, infotext=TEXT)
    assert path.name == f"00000-pic.{fmt}"
    assert read_infotext(path) == TEXT
    with Image.open(path) as back:
        assert back.size == (16, 8) and back.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt]


def test_png_metadata_is_the_webui_parameters_chunk(tmp_path):
    path = save_image(Image.new("RGB", (8, 8)), tmp_path, "p", infotext="x\nSteps: 1, Seed: 2, Size: 8x8")
    with Image.open(path) as img:
        assert img.info["parameters"] == "x\nSteps: 1, Seed: 2, Size: 8x8"


def test_unsupported_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unsupported image format"):
        save_image(Image.new("RGB", (8, 8)), tmp_path, "p", fmt="tga")
