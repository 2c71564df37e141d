"""The Latent Batch actions with the standalone host, without a browser: folders, interrupt,
hidden server folders, bad files next to good ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lib_vaebatch.ui import actions
from lib_vaebatch.ui.actions import DecodeRequest, EncodeRequest, Reporter, UserError
from lib_vaebatch.ui.standalone import APPROX_LABEL, StandaloneHost


def _latents(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "batch.safetensors"
    t = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"latents": t}, path, metadata={"format": "vaebatch/1", "family": "sd1"})
    return path


def test_folder_encode_then_decode(tmp_path):
    host = StandaloneHost(output_dir=tmp_path / "out")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 24), (40 * i, 90, 200)).save(src / f"{i}.png")
    (src / "notes.txt").write_text("not an image")
    enc = actions.encode(host, EncodeRequest(folder=str(src)), Reporter())
    assert enc.ok and len(enc.files) == 1 and len(enc.previews) == 3
    dec = actions.decode(host, DecodeRequest(folder=str(enc.files[0].parent)), Reporter())
    assert dec.ok and len(dec.images) == 3
    assert all(Path(p).parent == tmp_path / "out" / "images" for p, _ in dec.images)
    assert all(Image.open(p).size == (40, 24) for p, _ in dec.images)


def test_interrupt_stops_after_the_current_chunk_and_keeps_what_is_done(tmp_path):
    host = StandaloneHost(output_dir=tmp_path / "out")
    path = _latents(tmp_path / "lat", 4)
    seen = []

    def progress(done, total, text):
        seen.append(done)
        if done == 1:
            host.interrupt()  # the Interrupt button, pressed while the job runs

    req = DecodeRequest(uploads=[str(path)], options={"max_chunk": 1})
    dec = host.run(lambda rep: actions.decode(host, req, rep), progress)
    assert dec.cancelled and len(dec.images) == 1 and "interrupted: 3 sample(s)" in dec.log_html
    assert len(list((tmp_path / "out" / "images").iterdir())) == 1
    # the next job starts with the flag cleared
    again = host.run(lambda rep: actions.decode(host, DecodeRequest(uploads=[str(path)]), rep), None)
    assert again.ok and len(again.images) == 4


def test_a_bad_file_is_reported_and_the_good_ones_are_decoded(tmp_path):
    host = StandaloneHost(output_dir=tmp_path / "out")
    good = _latents(tmp_path / "lat", 2)
    bad = tmp_path / "lat" / "broken.safetensors"
    bad.write_bytes(b"\x00" * 5)
    dec = actions.decode(host, DecodeRequest(uploads=[str(good), str(bad)]), Reporter())
    assert len(dec.images) == 2 and not dec.ok and "broken.safetensors" in dec.log_html


def test_server_folders_can_be_hidden_and_unknown_vaes_are_refused(tmp_path):
    host = StandaloneHost(output_dir=tmp_path / "out", hide_dirs=True)
    with pytest.raises(UserError, match="disabled"):
        actions.encode(host, EncodeRequest(folder=str(tmp_path)), Reporter())
    with pytest.raises(UserError, match="unknown VAE"):
        actions.decode(host, DecodeRequest(uploads=[str(_latents(tmp_path / "lat"))], vae="nope"), Reporter())
    assert host.vae_labels() == [APPROX_LABEL] and not (tmp_path / "out").exists()


def test_flux_latents_decode_with_the_builtin_vae_and_impossible_tiling_is_refused(tmp_path):
    host = StandaloneHost(output_dir=tmp_path / "out")
    path = tmp_path / "flux.safetensors"
    save_file({"latents": torch.randn(1, 16, 8, 8)}, path)  # no family: 16 channels -> flux
    dec = actions.decode(host, DecodeRequest(uploads=[str(path)]), Reporter())
    assert dec.ok and "VAE Batch family: flux" in dec.infotexts[0]
    with pytest.raises(UserError, match="tiling 'always' is not possible"):
        actions.decode(host, DecodeRequest(uploads=[str(path)], options={"tiling": "always"}), Reporter())


def test_the_apps_tile_mode_choice_reaches_the_tiler(tmp_path, monkeypatch):
    """The app's decode options (its radio values) as the action gets them: exact-lean runs exact
    tiles with no spill store."""
    from lib_vaebatch.ui.app import decode_options
    from tests.support import record_tile_settings, save_module, tiny_autoencoder

    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    save_module(tiny_autoencoder(4, seed=11), vae_dir / "tiny.safetensors")
    host = StandaloneHost(vae_dir=vae_dir, output_dir=tmp_path / "out")
    options = decode_options(0, True, "fp32", "always", "exact-lean", 8)
    assert options["tile_mode"] == "exact-lean"
    seen = record_tile_settings(monkeypatch)
    dec = actions.decode(
        host,
        DecodeRequest(uploads=[str(_latents(tmp_path / "in", 2))], vae="tiny.safetensors", options=options),
        Reporter(),
    )
    assert dec.ok, dec.log_html
    assert len(seen) == 2 and all(t.mode == "exact-lean" and t.spill is None for t in seen), seen
