"""The command line, run as a real process: files written, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lib_vaebatch import infotext
from lib_vaebatch.latents import LatentBatch, read_latents, write_comfy_latent, write_latents
from lib_vaebatch.saving import read_infotext
from tests.support import (
    OVERFLOWS,
    cpu_runs_fp16,
    marked_latents,
    overflowing_backend,
    save_module,
    tiny_autoencoder,
)

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lib_vaebatch", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    return save_module(tiny_autoencoder(4, seed=11), tmp_path_factory.mktemp("vae") / "tiny-vae.safetensors")


def test_encode_one_size_then_decode_back(tmp_path, vae_file):
    images = [_png(tmp_path / f"img{i}.png", 70, 65, i) for i in range(3)]
    out = tmp_path / "lat.safetensors"
    enc = run_cli("encode", *images, "-o", out, "--vae", vae_file, "--no-progress")
    assert enc.returncode == 0, enc.stderr
    batch = read_latents(out)
    assert batch.latents.shape == (3, 4, 8, 8)  # 70x65 centre-cropped to 64x64
    assert batch.sources == ["img0.png", "img1.png", "img2.png"] and batch.sizes == [(70, 65)] * 3
    assert (batch.family, batch.scaled, batch.vae_name) == ("sd1", True, "tiny-vae.safetensors")
    assert batch.vae_hash and len(batch.vae_hash) == 10

    dec = run_cli("decode", out, "-o", tmp_path / "png", "--vae", vae_file, "--no-progress")
    assert dec.returncode == 0, dec.stderr
    files = sorted(os.listdir(tmp_path / "png"))
    assert files == ["00000-lat-0.png", "00001-lat-1.png", "00002-lat-2.png"]
    with Image.open(tmp_path / "png" / files[0]) as img:
        assert img.size == (64, 64)
    params = infotext.parse(read_infotext(tmp_path / "png" / files[0])).params
    assert params["VAE Batch"] == "on" and params["Size"] == "64x64" and params["VAE Batch family"] == "sd1"

    again = run_cli("decode", out, "-o", tmp_path / "png", "--vae", vae_file, "--no-progress")
    assert again.returncode == 0
    assert sorted(os.listdir(tmp_path / "png"))[3:] == [
        "00003-lat-0.png",
        "00004-lat-1.png",
        "00005-lat-2.png",
    ]


def test_mixed_sizes_give_one_file_per_size_and_existing_outputs_are_kept(tmp_path):
    images = [
        _png(tmp_path / "a.png", 64, 64),
        _png(tmp_path / "b.png", 80, 48),
        _png(tmp_path / "c.png", 64, 64, 2),
    ]
    out = tmp_path / "o.safetensors"
    proc = run_cli("encode", *images, "-o", out, "--no-progress", "--comfy")
    assert proc.returncode == 0, proc.stderr
    assert read_latents(tmp_path / "o-64x64.safetensors").latents.shape[0] == 2
    assert read_latents(tmp_path / "o-80x48.safetensors").latents.shape == (1, 4, 6, 10)
    assert read_latents(tmp_path / "o-80x48.latent").kind == "comfyui"
    before = (tmp_path / "o-64x64.safetensors").read_bytes()
    again = run_cli("encode", *images, "-o", out, "--no-progress")
    assert again.returncode == 2 and "not overwritten" in again.stderr
    assert (tmp_path / "o-64x64.safetensors").read_bytes() == before


def test_nan_latents_reject_the_file_before_any_decode(tmp_path, vae_file):
    good = write_latents(tmp_path / "good.safetensors", LatentBatch(marked_latents(2)))
    z = marked_latents(3)
    z[1, 2, 4, 4] = float("nan")
    bad = write_latents(tmp_path / "bad.safetensors", LatentBatch(z))
    out = tmp_path / "out"
    proc = run_cli("decode", good, bad, "-o", out, "--vae", vae_file, "--no-progress")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "bad.safetensors" in lines[0] and "sample 1" in lines[0] and "NaN" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p.write_bytes(b"definitely not safetensors"), ["corrupt"]),
        (lambda p: save_file({"latents": torch.zeros(1, 16, 8, 8)}, str(p)), ["16 channels", "takes 4"]),
        (
            lambda p: save_file({"latents": torch.full((2, 4, 8, 8), float("inf"))}, str(p)),
            ["sample 0", "Inf"],
        ),
    ],
    ids=["corrupt", "channels", "inf"],
)
def test_input_errors_are_one_line_and_write_nothing(tmp_path, vae_file, make, words):
    path = tmp_path / "x.safetensors"
    make(path)
    proc = run_cli("decode", path, "-o", tmp_path / "out", "--vae", vae_file, "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert str(path) in line and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ov", OVERFLOWS)
def test_failure_during_decode_keeps_the_good_images_and_exits_non_zero(tmp_path, ov):
    low, high = ov.names
    vae_path = save_module(overflowing_backend().module, tmp_path / "overflow.safetensors")
    z = marked_latents(4, scale=0.5)
    z[2] *= ov.factor
    lat = write_latents(tmp_path / "l.safetensors", LatentBatch(z))
    failed = run_cli(
        "decode",
        lat,
        "-o",
        tmp_path / "a",
        "--vae",
        vae_path,
        "--dtype",
        low,
        "--ladder",
        "",
        "--no-progress",
    )
    assert failed.returncode == 1
    assert sorted(os.listdir(tmp_path / "a")) == ["00000-l-0.png", "00001-l-1.png", "00002-l-3.png"]
    assert "sample 2 failed" in failed.stderr and "NaN" in failed.stderr and "Traceback" not in failed.stderr

    recovered = run_cli(
        "decode",
        lat,
        "-o",
        tmp_path / "b",
        "--vae",
        vae_path,
        "--dtype",
        low,
        "--ladder",
        "bf16,fp32,fp64",  # the default plus fp64, a rung for the fp32 case
        "--no-progress",
    )
    assert recovered.returncode == 0, recovered.stderr
    assert len(os.listdir(tmp_path / "b")) == 4
    status = infotext.parse(read_infotext(tmp_path / "b" / "00002-l-2.png")).params["VAE Batch"]
    assert status == f"recovered {high}"


def test_a_dtype_the_device_cannot_run_is_a_one_line_error(tmp_path, vae_file):
    """fp16 on the CPU: decodes where this torch has the kernels, else exit 2 before loading."""
    lat = write_latents(tmp_path / "l.safetensors", LatentBatch(marked_latents(1)))
    args = ("decode", lat, "-o", tmp_path / "out", "--vae", vae_file, "--device", "cpu", "--dtype", "fp16")
    proc = run_cli(*args, "--no-progress")
    if cpu_runs_fp16():
        assert proc.returncode == 0, proc.stderr
        assert os.listdir(tmp_path / "out") == ["00000-l-0.png"]
    else:
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert (
            proc.stderr.strip()
            .splitlines()[-1]
            .endswith("fp16 is not supported on cpu by this torch; use --dtype auto")
        )
        assert not (tmp_path / "out").exists()


def test_pattern_format_and_carried_parameters(tmp_path):
    params = [
        "a red fox\nNegative prompt: blur\nSteps: 20, Seed: 1234, Size: 64x64",
        "a cat\nSteps: 20, Seed: 99, Size: 64x64",
    ]
    lat = write_latents(
        tmp_path / "gen.safetensors", LatentBatch(marked_latents(2), family="sd1", parameters=params)
    )
    proc = run_cli(
        "decode",
        lat,
        "-o",
        tmp_path / "o",
        "--pattern",
        "[seed]-[prompt_words]",
        "--format",
        "jpg",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(os.listdir(tmp_path / "o"))
    assert files == ["00000-1234-a red fox.jpg", "00001-99-a cat.jpg"]
    text = read_infotext(tmp_path / "o" / files[0])
    info = infotext.parse(text)
    assert info.prompt == "a red fox" and info.negative_prompt == "blur"
    assert info.params["Seed"] == "1234" and info.params["VAE Batch VAE"] == "approx-sd1 (preview quality)"


def test_comfyui_latent_decodes_with_the_approximation(tmp_path):
    raw = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    lat = write_comfy_latent(tmp_path / "ComfyUI_00001_.latent", raw)
    proc = run_cli("decode", lat, "-o", tmp_path / "o", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "o")) == ["00000-ComfyUI_00001_-0.png", "00001-ComfyUI_00001_-1.png"]
    assert (
        infotext.parse(read_infotext(tmp_path / "o" / "00000-ComfyUI_00001_-0.png")).params[
            "VAE Batch family"
        ]
        == "flux"
    )


def test_bad_image_is_reported_and_nothing_is_written(tmp_path):
    good = _png(tmp_path / "good.png", 64, 64)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    proc = run_cli("encode", good, tmp_path / "bad.png", "-o", tmp_path / "o.safetensors", "--no-progress")
    assert proc.returncode == 2 and "bad.png" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_demo_runs_the_round_trip(tmp_path):
    proc = run_cli("demo", "-o", tmp_path / "demo", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    images = sorted((tmp_path / "demo" / "images").iterdir())
    assert len(images) == 5
    assert all(infotext.parse(read_infotext(p) or "").params.get("VAE Batch") == "on" for p in images)
    assert "preview quality" in proc.stdout


def test_usage_errors(tmp_path):
    assert run_cli("--version").stdout.startswith("VAE Batch")
    proc = run_cli("decode", "x.safetensors", "-o", tmp_path, "--chunk", "0")
    assert proc.returncode == 2 and "--chunk must be at least 1" in proc.stderr
    proc = run_cli(
        "decode",
        tmp_path / "missing.safetensors",
        "-o",
        tmp_path / "o",
        "--vae",
        tmp_path / "nope.safetensors",
    )
    assert proc.returncode == 2 and "nope.safetensors: no such file" in proc.stderr


def test_tiled_decode_matches_untiled_and_tile_size_is_checked(tmp_path, vae_file):
    lat = write_latents(tmp_path / "big.safetensors", LatentBatch(marked_latents(1, size=24)))
    plain = run_cli(
        "decode", lat, "-o", tmp_path / "plain", "--vae", vae_file, "--tiling", "never", "--no-progress"
    )
    tiled = run_cli("decode", lat, "-o", tmp_path / "tiled", "--vae", vae_file, "--tiling", "always",
                    "--tile-size", "8", "--no-progress", "-v")  # fmt: skip
    assert plain.returncode == 0 and tiled.returncode == 0, tiled.stderr
    a = np.asarray(Image.open(tmp_path / "plain" / "00000-big-0.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "tiled" / "00000-big-0.png")).astype(int)
    assert a.shape == b.shape == (192, 192, 3) and np.abs(a - b).max() <= 1
    assert (
        infotext.parse(read_infotext(tmp_path / "tiled" / "00000-big-0.png")).params["VAE Batch"]
        == "on, tiled"
    )
    bad = run_cli("decode", lat, "-o", tmp_path / "x", "--tile-size", "4")
    assert bad.returncode == 2 and "at least 8" in bad.stderr


def test_no_spill_reaches_the_engine_options():
    from lib_vaebatch.cli import _engine_options, build_parser

    parser = build_parser()
    default = _engine_options(parser.parse_args(["decode", "x.safetensors", "-o", "out"]))
    off = _engine_options(parser.parse_args(["decode", "x.safetensors", "-o", "out", "--no-spill"]))
    assert default.spill is True and off.spill is False


def test_exact_lean_reaches_the_tiler_without_a_spill_store(tmp_path, vae_file, monkeypatch):
    """``--tile-mode exact-lean``: every tiled call runs exact mode with no spill store."""
    from lib_vaebatch import cli
    from tests.support import record_tile_settings

    lat = write_latents(tmp_path / "lat.safetensors", LatentBatch(marked_latents(2, size=16)))
    seen = record_tile_settings(monkeypatch)
    args = ["decode", str(lat), "-o", str(tmp_path / "out"), "--vae", str(vae_file), "--tiling", "always",
            "--tile-mode", "exact-lean", "--tile-size", "8", "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    assert len(seen) == 2 and all(s.mode == "exact-lean" and s.spill is None for s in seen), seen
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
