"""Batch encode: sizes, crop/resize, alpha, EXIF orientation, determinism, seeded sampling."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lib_vaebatch.backends import ApproxVAE
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.encode import EncodeOptions, encode_images, encode_pixels
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.families import to_scaled
from lib_vaebatch.images import ImageInputError, prepare_image
from tests.support import Recorder, tiny_backend


def _image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


@pytest.fixture(scope="module")
def vae():
    return tiny_backend()


def test_mixed_sizes_are_grouped_and_cropped_to_multiples_of_8(vae):
    images = [_image(70, 65, 0), _image(64, 64, 1), _image(71, 70, 2), _image(40, 48, 3)]
    result = encode_images(vae, images)
    assert result.ok
    sizes = [(g.width, g.height) for g in result.groups]
    assert sizes == [(64, 64), (40, 48)]  # 70x65 and 71x70 crop to 64x64, like 64x64
    first = result.groups[0]
    assert first.input_indices == [0, 1, 2]
    assert first.latents.shape == (3, 4, 8, 8)
    assert first.original_sizes == [(70, 65), (64, 64), (71, 70)]
    assert result.groups[1].latents.shape == (1, 4, 6, 5)


def test_centre_crop_takes_the_middle():
    img = Image.new("RGB", (20, 12), (0, 0, 0))
    img.paste((255, 0, 0), (2, 2, 18, 10))  # the 16x8 centre is red
    prepared = prepare_image(img)
    assert prepared.size == (16, 8)
    assert (prepared.pixels[0] == 255).all() and (prepared.pixels[1] == 0).all()


def test_resize_mode_rounds_to_multiples_of_8():
    prepared = prepare_image(_image(70, 61), fit="resize")
    assert prepared.size == (72, 64)


def test_alpha_is_composited_on_the_background_or_dropped():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert prepare_image(img, background="#00ff00").pixels[:, 0, 0].tolist() == [0, 255, 0]
    assert prepare_image(img, alpha="drop").pixels[:, 0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (16, 8), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    prepared = prepare_image(buf.getvalue())
    assert prepared.size == (8, 16)


@pytest.mark.parametrize("mode", ["I;16", "P", "CMYK", "LA", "L"])
def test_odd_modes_become_rgb(mode):
    if mode == "I;16":
        img = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16), "I;16")
        expected = round(40000 / 65535 * 255)
        assert prepare_image(img).pixels[:, 0, 0].tolist() == [expected] * 3
        return
    img = Image.new("RGB", (8, 8), (10, 200, 30)).convert(mode)
    px = prepare_image(img).pixels
    assert px.shape == (3, 8, 8) and px.dtype == torch.uint8


def test_too_small_and_broken_images_name_the_problem(tmp_path):
    with pytest.raises(ImageInputError, match="smaller than the 8x8 minimum"):
        prepare_image(Image.new("RGB", (7, 30)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ImageInputError, match=r"broken\.png"):
        prepare_image(broken)
    with pytest.raises(ImageInputError, match="pixel limit"):
        prepare_image(Image.new("RGB", (64, 64)).tobytes() and _png_bytes(64, 64), max_pixels=1000)


def _png_bytes(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, "PNG")
    return buf.getvalue()


def test_encode_is_the_posterior_mean_by_default_and_matches_the_module(vae):
    img = _image(64, 64, 5)
    result = encode_images(vae, [img])
    px = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.module.encode(px).latent_dist.mean
    expected = to_scaled(mean, vae.scaling_factor, vae.shift_factor)
    assert torch.allclose(result.groups[0].latents, expected, atol=1e-5)
    again = encode_images(vae, [img])
    assert torch.equal(result.groups[0].latents, again.groups[0].latents)


def test_seeded_sampling_is_reproducible_and_independent_of_chunking(vae):
    px = torch.stack([prepare_image(_image(64, 64, s)).pixels for s in range(4)])
    rec = Recorder(vae)
    a = encode_pixels(rec, px, sample=True, seed=7, options=EngineOptions(max_chunk=4))
    b = encode_pixels(vae, px, sample=True, seed=7, options=EngineOptions(chunk_mode="per-sample"))
    c = encode_pixels(vae, px, sample=True, seed=8)
    mean = encode_pixels(vae, px)
    assert rec.calls[0][0] == 4
    for i in range(4):
        assert torch.allclose(a.outputs[i], b.outputs[i], atol=1e-5)
        assert not torch.allclose(a.outputs[i], c.outputs[i])
        assert not torch.allclose(a.outputs[i], mean.outputs[i])


def test_16_channel_encode_applies_scale_and_shift():
    vae = tiny_backend(16, family="flux")
    result = encode_images(vae, [_image(64, 64)])
    px = prepare_image(_image(64, 64)).pixels[None].float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.module.encode(px).latent_dist.mean
    assert torch.allclose(result.groups[0].latents, (mean - 0.1159) * 0.3611, atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux"])
def test_approx_round_trip_is_exact_for_flat_colours(family):
    # The pseudo-inverse recovers any RGB exactly at latent resolution, and bilinear upsampling of
    # a flat field is flat: solid colours must come back unchanged (up to rounding).
    vae = ApproxVAE(family)
    colours = [(200, 30, 40), (20, 180, 90), (128, 128, 128), (250, 250, 5)]
    images = [Image.new("RGB", (24, 16), c) for c in colours]
    enc = encode_images(vae, images)
    dec = decode_latents(vae, enc.groups[0].latents)
    for colour, out in zip(colours, dec.outputs, strict=True):
        rgb = ((out + 1) * 127.5).reshape(3, -1)
        assert (rgb - torch.tensor(colour, dtype=torch.float32)[:, None]).abs().max() < 0.5
    assert vae.preview and vae.display_name.endswith("(preview quality)")


def test_encode_options_are_validated():
    with pytest.raises(ValueError, match="fit"):
        EncodeOptions(fit="stretch")
    with pytest.raises(ValueError, match="alpha"):
        EncodeOptions(alpha="keep")
