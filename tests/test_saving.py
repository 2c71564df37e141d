from __future__ import annotations

import io
import json
import logging

import piexif
import piexif.helper
import pytest
from PIL import Image, PngImagePlugin

from lib_vaebatch import saving
from lib_vaebatch.saving import (
    avif_available,
    encode_image,
    format_for,
    normalize_format,
    read_info,
    read_infotext,
    save_image,
)

TEXT = 'a fox "quoted", ünïcödé 狐\nNegative prompt: x\nSteps: 1, Seed: 2, Size: 8x8, VAE Batch: on'
TEXTS = {
    "latin1": "a red fox, (forest:1.2)\nNegative prompt: blur\nSteps: 20, Sampler: Euler a, Seed: 1",
    "japanese": "夕暮れの海辺で眠る猫、桜\nNegative prompt: 低品質\nSteps: 20, Seed: 3, Size: 16x8",
    "emoji": "🦊✨ fox with 🌸\n\nsecond paragraph\nNegative prompt: 👎\nSteps: 1, Seed: 2, Size: 16x8",
    "mixed": TEXT,
}
NEEDS_AVIF = pytest.mark.skipif(not avif_available(), reason="Pillow cannot write AVIF here")
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
FORMATS = [
    "png",
    "jpg",
    "webp",
    pytest.param("avif", marks=NEEDS_AVIF),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_metadata_round_trips_in_every_format(tmp_path, fmt, kind):
    img = Image.new("RGB", (16, 8), (10, 20, 30))
    path = save_image(img, tmp_path, "pic", fmt=fmt, infotext=TEXTS[kind])
    assert path.name == f"00000-pic.{fmt}"
    assert read_infotext(path) == TEXTS[kind]
    with Image.open(path) as back:
        assert back.size == (16, 8) and back.format == PIL_FORMAT[fmt]
        assert read_infotext(back) == TEXTS[kind]


def test_png_metadata_is_the_webui_parameters_chunk(tmp_path):
    path = save_image(Image.new("RGB", (8, 8)), tmp_path, "p", infotext="x\nSteps: 1, Seed: 2, Size: 8x8")
    with Image.open(path) as img:
        assert img.info["parameters"] == "x\nSteps: 1, Seed: 2, Size: 8x8"
    # Latin-1 text goes in tEXt, anything else in iTXt (UTF-8), as Pillow's add_text chooses
    assert b"tEXtparameters\x00" in path.read_bytes()
    jp = save_image(Image.new("RGB", (8, 8)), tmp_path, "p", infotext=TEXTS["japanese"])
    assert b"iTXtparameters\x00" in jp.read_bytes()


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_exif_is_the_webui_user_comment(tmp_path, fmt):
    path = save_image(Image.new("RGB", (8, 8)), tmp_path, "p", fmt=fmt, infotext=TEXTS["emoji"])
    with Image.open(path) as img:
        raw = piexif.load(img.info["exif"])["Exif"][piexif.ExifIFD.UserComment]
    assert raw.startswith(b"UNICODE\x00")  # piexif's "unicode" encoding, as the webui writes
    assert piexif.helper.UserComment.load(raw) == TEXTS["emoji"]


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_files_written_the_webui_way_are_read(tmp_path, fmt):
    # the webui saves the image, then piexif.insert()s the EXIF into the file
    path = tmp_path / f"webui.{fmt}"
    Image.new("RGB", (8, 8)).save(path, quality=80)
    piexif.insert(saving.exif_user_comment(TEXTS["japanese"]), str(path))
    assert read_infotext(path) == TEXTS["japanese"]


def test_legacy_cases_the_webui_reads(tmp_path):
    gif = tmp_path / "a.gif"
    Image.new("P", (8, 8)).save(gif, comment="gif prompt\nSteps: 3")
    assert read_infotext(gif) == "gif prompt\nSteps: 3"

    novelai = tmp_path / "nai.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "NovelAI")
    info.add_text("Description", "1girl, fox ears")
    comment = {"uc": "lowres", "steps": 28, "sampler": "k_euler_ancestral", "scale": 11, "seed": 42}
    info.add_text("Comment", json.dumps(comment))
    Image.new("RGB", (64, 32)).save(novelai, pnginfo=info)
    text, items = read_info(novelai)
    assert text == (
        "1girl, fox ears\nNegative prompt: lowres\nSteps: 28, Sampler: Euler a, CFG scale: 11, Seed: 42, "
        "Size: 64x32, Clip skip: 2, ENSD: 31337"
    )
    assert items["Software"] == "NovelAI" and "parameters" not in items


def test_exif_user_comment_wins_over_png_parameters(tmp_path):
    path = tmp_path / "both.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "from text")
    Image.new("RGB", (8, 8)).save(path, pnginfo=info, exif=saving.exif_user_comment("from exif"))
    assert read_infotext(path) == "from exif"  # the webui's order
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain, pnginfo=info, exif=Image.Exif().tobytes())
    assert read_infotext(plain) == "from text"  # an EXIF without a comment changes nothing


def test_images_without_metadata(tmp_path):
    for fmt in ("png", "jpg", "webp"):
        path = save_image(Image.new("RGB", (8, 8)), tmp_path, "none", fmt=fmt)
        assert read_infotext(path) is None
    assert read_infotext(Image.new("RGB", (8, 8))) is None


def test_jpeg_metadata_too_long_for_exif_is_left_out(tmp_path, caplog):
    long = "x" * 40_000  # 80 kB in UTF-16: more than one JPEG segment holds
    with caplog.at_level(logging.WARNING, logger="vaebatch"):
        path = save_image(Image.new("RGB", (8, 8)), tmp_path, "p", fmt="jpg", infotext=long)
    assert read_infotext(path) is None and "does not fit" in caplog.text
    webp = save_image(Image.new("RGB", (8, 8)), tmp_path, "p", fmt="webp", infotext=long)
    assert read_infotext(webp) == long  # WebP has no such limit


def test_too_large_images_are_saved_as_png(tmp_path):
    assert format_for(Image.new("RGB", (16384, 1)), "webp") == "png"
    assert format_for(Image.new("RGB", (16383, 1)), "webp") == "webp"
    assert format_for(Image.new("RGB", (16384, 1)), "jpeg") == "jpg"
    path = save_image(Image.new("RGB", (16384, 1)), tmp_path, "wide", fmt="webp", infotext="w")
    assert path.name == "00000-wide.png" and read_infotext(path) == "w"


def test_never_overwrites(tmp_path):
    (tmp_path / "00000-p.png").write_bytes(b"mine")
    path = save_image(Image.new("RGB", (8, 8)), tmp_path, "p")
    assert path.name == "00001-p.png" and (tmp_path / "00000-p.png").read_bytes() == b"mine"


def test_modes_are_converted_for_jpeg_and_webp():
    for mode in ("RGBA", "P", "I;16", "LA"):
        data = encode_image(Image.new(mode, (8, 8)), "jpg", "t")
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and read_infotext(img) == "t"


def test_unsupported_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unsupported image format"):
        save_image(Image.new("RGB", (8, 8)), tmp_path, "p", fmt="tga")
    assert normalize_format(".JPEG") == "jpg"


def test_avif_without_a_plugin_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(saving, "avif_available", lambda: False)
    with pytest.raises(ValueError, match=r"AVIF is not available.*pillow-avif-plugin"):
        normalize_format("avif")


def test_avif_gets_the_webui_exif(monkeypatch):
    # Whatever plugin writes AVIF is handed the EXIF UserComment and the quality, as the webui does.
    seen = {}

    def fake_save(im, fp, filename):
        seen.update(im.encoderinfo, mode=im.mode)
        fp.write(b"avif")

    monkeypatch.setattr(saving, "avif_available", lambda: True)
    monkeypatch.setitem(Image.SAVE, "AVIF", fake_save)
    assert encode_image(Image.new("LA", (8, 8)), "avif", TEXTS["emoji"], quality=80) == b"avif"
    assert seen["quality"] == 80 and seen["mode"] == "RGBA"
    assert saving._exif_comment(seen["exif"]) == TEXTS["emoji"]
