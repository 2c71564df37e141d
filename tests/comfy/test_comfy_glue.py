"""The node pack in a fake ComfyUI kept faithful to comfy-reference.md (tests/comfy/fakecomfy): node
schemas, the same pixels as ComfyUI's own decode and encode, NaN recovery of only the failed
images, the out-of-memory ladder keeping finished images, interrupt between chunks, mixed sizes,
and what is handed back to ComfyUI's own decode."""

from __future__ import annotations

import pytest
import torch

from lib_vaebatch.comfy.options import DECODE_OPTIONS
from tests.comfy.host import PromptError
from tests.support import marked_latents, needs_fp16_cpu, overflowing_backend, tiny_autoencoder

#: The options a node takes and their defaults (the command line's: NaN check on, ladder
#: bf16,fp32, tiling auto, tile mode exact, tile size and chunk planned).
DEFAULTS = {"nan_check": True, "ladder": "bf16, fp32", "tiling": "auto", "tile_mode": "exact", "tile_size": 0,
            "max_chunk": 0}  # fmt: skip


@pytest.fixture
def vae(comfy):
    return comfy.vae(tiny_autoencoder(4, seed=11))


def _decoder_calls(vae) -> list[int]:
    calls: list[int] = []
    vae.first_stage_model.decoder.conv_in.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls


def _decode(comfy, vae, z, **options):
    node = comfy.nodes["VAEBatchDecode"]
    return comfy.run(node, {"samples": {"samples": z}, "vae": vae, **options})


# -- schemas ---------------------------------------------------------------------------------------
def test_node_ids_inputs_and_defaults_are_the_contract(comfy):
    assert set(comfy.nodes) == {
        "VAEBatchDecode",
        "VAEBatchEncode",
        "VAEBatchEncodeImages",
        "VAEBatchRemoteVAE",
    }
    assert comfy.web_directory == "./web"
    dec = comfy.nodes["VAEBatchDecode"].GET_SCHEMA().v1_info()
    assert list(dec["input"]["required"]) == ["samples", "vae"]
    assert dec["input"]["required"]["samples"][0] == "LATENT" and dec["input"]["required"]["vae"][0] == "VAE"
    opts = dec["input"]["optional"]
    assert {k: v[1]["default"] for k, v in opts.items()} == DEFAULTS
    assert opts["tile_mode"][0] == "COMBO"
    assert opts["tile_mode"][1]["options"] == ["exact", "exact-lean", "fast", "auto", "plain"]
    assert dec["output"] == ["IMAGE", "STRING"] and dec["input"]["hidden"] == {"unique_id": ("UNIQUE_ID",)}
    enc = comfy.nodes["VAEBatchEncode"].GET_SCHEMA().v1_info()
    assert list(enc["input"]["required"]) == ["pixels", "vae"] and enc["output"] == ["LATENT", "STRING"]
    imgs = comfy.nodes["VAEBatchEncodeImages"].GET_SCHEMA().v1_info()
    assert list(imgs["input"]["required"]) == ["vae", "image_1"]
    assert [k for k in imgs["input"]["optional"] if k.startswith("image_")] == [
        f"image_{i}" for i in range(2, 65)
    ]
    assert imgs["output"] == ["LATENT", "STRING"] and imgs["output_is_list"] == [True, False]
    assert [o.name for o in DECODE_OPTIONS] == list(DEFAULTS)


# -- decode ----------------------------------------------------------------------------------------
def test_decode_gives_comfyuis_own_pixels_and_a_report(comfy, vae):
    z = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        own = vae.decode(z)  # what VAEDecode returns
    comfy.mm.calls.clear()
    (images, report), ui = _decode(comfy, vae, z)
    assert images.shape == own.shape == (3, 64, 96, 3) and images.dtype == torch.float32
    assert images.device == comfy.mm.intermediate_device()
    assert (images - own).abs().max().item() <= 1e-5
    assert ui == {"text": [report]} and report.startswith("VAE Batch decode: 3 image(s) of 96x64")
    # Loaded through ComfyUI's memory manager with our planner's request for one image.
    from lib_vaebatch.comfy.backend import ComfyVAE
    from lib_vaebatch.engine.planner import estimate_bytes

    backend = ComfyVAE(vae)
    want = estimate_bytes(backend, "decode", 64 * 96, torch.float32) + backend.fixed_bytes("decode")
    loads = [c for c in comfy.mm.calls if c[0] == "load"]
    assert loads == [("load", [vae.patcher], want, False)]
    assert ("empty",) in comfy.mm.calls
    assert comfy.progress and comfy.progress[-1] == (3, 3, "1"), "the node's bar reaches the end"


@needs_fp16_cpu
def test_only_the_images_that_overflow_are_decoded_again_and_the_weights_are_restored(
    comfy, cpu_chunks_by_memory
):
    """An fp16 VAE (ComfyUI's --fp16-vae) whose activations overflow for two of four latents: ComfyUI
    alone gives NaN (saved black); the node decodes those two again in bf16, only those."""
    vae = comfy.vae(overflowing_backend(seed=2).module, dtype=torch.float16)
    z = marked_latents(4, size=4) * 0.2
    z[[1, 3]] *= 200
    with torch.inference_mode():
        own = vae.decode(z)
    assert not torch.isfinite(own[[1, 3]]).all() and torch.isfinite(own[[0, 2]]).all()
    calls = _decoder_calls(vae)
    (images, report), _ = _decode(comfy, vae, z, ladder="bf16, fp32", max_chunk=4)
    assert torch.isfinite(images).all() and images[[1, 3]].std() > 0
    assert calls == [4, 2] or calls == [4, 1, 1], "the batch once, then only the two failed images"
    assert report.count("recovered in bf16") == 2
    assert next(vae.first_stage_model.parameters()).dtype == torch.float16, "ComfyUI's dtype restored"
    assert (images[[0, 2]] - own[[0, 2]]).abs().max().item() <= 1e-5


def test_an_image_that_overflows_in_every_precision_is_reported_and_black(comfy):
    """fp32 weights, a latent that overflows fp32 too (the node's ladders end at fp32)."""
    vae = comfy.vae(overflowing_backend(seed=2).module)
    z = marked_latents(2, size=4) * 0.2
    z[1] *= 1e37
    (images, report), _ = _decode(comfy, vae, z)
    assert "image 1: non-finite output in fp32" in report and "no more robust precision" in report
    assert images[1].abs().max().item() == 0 and torch.isfinite(images).all()


def test_a_non_finite_latent_is_reported_as_the_samplers_and_comes_back_black(comfy, vae):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    z[1, 0, 2, 2] = float("nan")
    calls = _decoder_calls(vae)
    (images, report), _ = _decode(comfy, vae, z)
    assert "image 1: the latent itself is non-finite (1 NaN, 0 Inf values)" in report
    assert "no VAE retry can fix that" in report
    assert images[1].abs().max().item() == 0 and images[0].abs().max().item() > 0
    assert sum(calls) == 2, "the VAE never saw the bad latent"


def _oom_when(predicate):
    def hook(module, args):
        if predicate(args[0]):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    return hook


def test_out_of_memory_keeps_finished_images_and_goes_to_exact_tiles_not_comfyuis(comfy, vae):
    z = torch.randn(3, 4, 24, 24, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        own = vae.decode(z)
    module = vae.first_stage_model
    whole: list[int] = []
    real = module.decode

    def decode(x, **kw):  # the module's untiled decode; the third one (image 2) runs out of memory
        whole.append(x.shape[0])
        if len(whole) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(x, **kw)

    module.decode = decode
    (images, report), _ = _decode(comfy, vae, z, max_chunk=1)
    assert whole == [1, 1, 1], "images 0 and 1 were not decoded again; image 2 went to tiles"
    assert (images - own).abs().max().item() <= 1e-4, "exact tiles"
    assert "out of memory at chunk 1; decode continues in tiles" in report
    assert "image 2: exact tiles" in report


def test_when_every_tiled_path_fails_comfyuis_own_tiles_decode_it_labelled(comfy, vae):
    from tests.forge import threepass

    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    vae.first_stage_model.decoder.conv_in.register_forward_pre_hook(_oom_when(lambda x: not threepass.ACTIVE))
    threepass.OUTPUTS.clear()
    (images, report), _ = _decode(comfy, vae, z)
    assert len(threepass.OUTPUTS) == 2
    assert (images - torch.cat(threepass.OUTPUTS).movedim(1, -1)).abs().max().item() <= 1e-6
    assert report.count("decoded by ComfyUI's own 3-pass tiles (approximate)") == 2


def test_interrupt_stops_after_the_current_chunk(comfy, vae):
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    calls = _decoder_calls(vae)
    vae.first_stage_model.decoder.conv_in.register_forward_pre_hook(
        lambda m, a: comfy.mm.interrupt_current_processing(True) if len(calls) == 2 else None
    )
    graph = {
        "1": {
            "class_type": "VAEBatchDecode",
            "inputs": {"samples": {"samples": z}, "vae": vae, "max_chunk": 1},
        }
    }
    history = comfy.prompt(graph)
    assert history.status == "interrupted", history.error
    assert len(calls) == 2, "stopped after the chunk that was running"
    assert comfy.mm.processing_interrupted() is False, "the flag was taken, as ComfyUI's own raise takes it"


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"tile_size": 3}, "tile_size - tile_size: a tile is at least 8 latent pixels (0 plans it), not 3"),
        ({"tile_size": 10**9}, "tile_size: expected 0..1024, not 1000000000"),
        ({"ladder": "sideways"}, "ladder: expected one of bf16, fp32, fp32, bf16, none, not 'sideways'"),
        ({"max_chunk": -3}, "max_chunk: expected 0..4096, not -3"),
        ({"nan_check": "abc"}, None),
    ],
)
def test_bad_option_values_are_refused_before_the_graph_runs(comfy, vae, options, why):
    z = torch.randn(1, 4, 8, 8)
    graph = {
        "7": {"class_type": "VAEBatchDecode", "inputs": {"samples": {"samples": z}, "vae": vae, **options}}
    }
    calls = _decoder_calls(vae)
    if why is None:  # ComfyUI's own conversion takes any value for a BOOLEAN (bool("abc"))
        comfy.prompt(graph)
        return
    with pytest.raises(PromptError) as err:
        comfy.prompt(graph)
    details = [e["details"] for e in err.value.node_errors["7"]]
    assert any(why in d for d in details), details
    assert all(e["type"] == "custom_validation_failed" for e in err.value.node_errors["7"])
    assert calls == [], "nothing ran"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda vae: setattr(vae, "latent_dim", 3), "a video (3-D) VAE"),
        (lambda vae: setattr(vae, "first_stage_model", None), "did not recognise"),
        (lambda vae: setattr(vae, "upscale_ratio", 16), "scales by 16"),
    ],
)
def test_what_the_engine_does_not_drive_goes_back_to_comfyuis_decode_with_one_line(comfy, vae, change, why):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    calls: list[str] = []
    real = vae.decode
    vae.decode = lambda samples, vae_options={}: (calls.append("own"), real(samples))[1]
    change(vae)
    if vae.first_stage_model is None:
        vae.decode = lambda samples, vae_options={}: (calls.append("own"), torch.zeros(2, 64, 64, 3))[1]
    (images, report), _ = _decode(comfy, vae, z)
    assert calls == ["own"]
    assert report.count("\n") == 0 and report.startswith("VAE Batch: handed back to ComfyUI's own decode")
    assert why in report and images.shape == (2, 64, 64, 3)


# -- encode ----------------------------------------------------------------------------------------
def test_encode_gives_comfyuis_latents_cropped_the_same_with_alpha_dropped(comfy, vae):
    rgba = torch.rand(2, 70, 45, 4, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        own = vae.encode(rgba[..., :3])  # what VAEEncode returns: cropped to 64x40
    node = comfy.nodes["VAEBatchEncode"]
    (latent, report), _ = comfy.run(node, {"pixels": rgba, "vae": vae})
    assert latent["samples"].shape == own.shape == (2, 4, 8, 5)
    assert (latent["samples"] - own).abs().max().item() <= 1e-5
    (again, _), _ = comfy.run(node, {"pixels": rgba, "vae": vae})
    assert torch.equal(again["samples"], latent["samples"]), "the posterior mean: deterministic"
    assert "VAE Batch encode: 2 image(s) of 40x64" in report


def test_encode_images_keeps_each_size_and_the_order_and_decodes_back_one_per_input(comfy, vae):
    g = torch.Generator().manual_seed(8)
    a1, b, a2 = (
        torch.rand(1, 64, 64, 3, generator=g),
        torch.rand(2, 48, 80, 3, generator=g),
        torch.rand(1, 64, 64, 3, generator=g),
    )
    node = comfy.nodes["VAEBatchEncodeImages"]
    enc_calls = []
    vae.first_stage_model.encoder.conv_in.register_forward_pre_hook(
        lambda m, a: enc_calls.append(tuple(a[0].shape))
    )
    (latents, report), _ = comfy.run(node, {"vae": vae, "image_1": a1, "image_2": b, "image_3": a2})
    assert [tuple(lat["samples"].shape) for lat in latents] == [(1, 4, 8, 8), (2, 4, 6, 10), (1, 4, 8, 8)]
    assert sorted(enc_calls) == [(1, 3, 48, 80), (1, 3, 48, 80), (1, 3, 64, 64), (1, 3, 64, 64)] or sorted(
        enc_calls
    ) == [(2, 3, 48, 80), (2, 3, 64, 64)], "each size encoded together"
    assert "4 image(s) from 3 input(s), 2 size(s), 3 LATENT(s) in input order" in report
    with torch.inference_mode():
        for lat, src in zip(latents, (a1, b, a2), strict=True):
            assert (lat["samples"] - vae.encode(src)).abs().max().item() <= 1e-5
    # VAE Batch Decode of that output: one image per input, at its size, in input order
    (images, _report), _ = comfy.run(comfy.nodes["VAEBatchDecode"], {"samples": latents, "vae": vae})
    assert [tuple(im.shape) for im in images] == [(1, 64, 64, 3), (2, 48, 80, 3), (1, 64, 64, 3)]


# -- a remote VAE ------------------------------------------------------------------------------------
def test_a_remote_vae_feeds_the_nodes_and_comfyuis_own_decode_and_encode(comfy, tmp_path):
    """VAE Batch Remote VAE over a real VAE Batch server on 127.0.0.1 (its built-in approximate
    VAE): the nodes decode and encode through it, and so do ComfyUI's own nodes (they call the
    VAE's decode/encode)."""
    from lib_vaebatch.backends import ApproxVAE
    from lib_vaebatch.engine.decode import decode_latents
    from lib_vaebatch.engine.encode import encode_pixels
    from tests.ui.conftest import running_server

    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    local = torch.stack(decode_latents(ApproxVAE("sd1"), z, scaled=False).outputs)  # type: ignore[arg-type]
    want = ((local + 1) / 2).clamp(0, 1).movedim(1, -1)
    with running_server(tmp_path, "--device", "cpu") as srv:
        node = comfy.nodes["VAEBatchRemoteVAE"]
        (vae,), _ = comfy.run(node, {"endpoint": srv.url + "vaebatch/v1/remote/decode", "family": "auto"})
        (images, report), _ = _decode(comfy, vae, z)
        assert (images - want).abs().max().item() <= 2e-3, "the endpoint answers float16"
        assert report.startswith("VAE Batch decode: 3 image(s) of 64x64")
        with torch.inference_mode():
            own = vae.decode(z)  # what ComfyUI's VAE Decode does with it
        assert (own - want).abs().max().item() <= 2e-3
        pixels = want[:2]
        (latent, _report), _ = comfy.run(comfy.nodes["VAEBatchEncode"], {"pixels": pixels, "vae": vae})
        ref = encode_pixels(ApproxVAE("sd1"), pixels.movedim(-1, 1) * 2 - 1)
        raw = torch.stack(ref.outputs) / ApproxVAE("sd1").scaling_factor  # type: ignore[arg-type]
        assert (latent["samples"] - raw).abs().max().item() <= 1e-2
        assert (vae.encode(pixels) - latent["samples"]).abs().max().item() <= 1e-5
    with pytest.raises(PromptError) as err:
        comfy.prompt(
            {
                "1": {
                    "class_type": "VAEBatchRemoteVAE",
                    "inputs": {"endpoint": "file:///etc/passwd", "family": "sd1"},
                }
            }
        )
    assert "expected an http(s) URL" in str(err.value.node_errors["1"])
