"""Latents files: ours, ComfyUI .latent, .npy; validation before anything is decoded."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lib_vaebatch.latents import LatentBatch, LatentFileError, read_latents, write_comfy_latent, write_latents


def test_round_trip_with_all_metadata(tmp_path):
    z = torch.randn(2, 4, 8, 6)
    batch = LatentBatch(
        z,
        scaled=True,
        family="sdxl",
        scaling_factor=0.13025,
        shift_factor=0.0,
        sources=["a.png", "b.png"],
        sizes=[(50, 70), (48, 64)],
        vae_name="x.safetensors",
        vae_hash="0123456789",
        parameters=["p1", "p2\nSteps: 1"],
    )
    path = write_latents(tmp_path / "l.safetensors", batch)
    back = read_latents(path)
    assert torch.equal(back.latents, z)
    assert (back.family, back.scaled, back.scaling_factor, back.sources, back.sizes) == (
        "sdxl",
        True,
        0.13025,
        ["a.png", "b.png"],
        [(50, 70), (48, 64)],
    )
    assert back.parameters == ["p1", "p2\nSteps: 1"] and back.vae_hash == "0123456789"
    with pytest.raises(FileExistsError):
        write_latents(path, batch)
    half = read_latents(write_latents(tmp_path / "h.safetensors", batch, half=True))
    assert half.latents.dtype == torch.float32 and torch.allclose(half.latents, z, atol=1e-2)


def test_a_file_with_only_the_tensor_works(tmp_path):
    save_file({"latents": torch.ones(1, 16, 4, 4)}, str(tmp_path / "bare.safetensors"))
    batch = read_latents(tmp_path / "bare.safetensors")
    assert batch.scaled and batch.family is None and batch.resolve_family().name == "flux"
    save_file({"anything": torch.ones(1, 4, 4, 4)}, str(tmp_path / "one.safetensors"))
    assert read_latents(tmp_path / "one.safetensors").resolve_family().name == "sd1"


def test_comfyui_latent_current_and_legacy(tmp_path):
    raw = torch.randn(2, 4, 8, 8)
    cur = read_latents(write_comfy_latent(tmp_path / "a.latent", raw))
    assert cur.kind == "comfyui" and not cur.scaled and torch.equal(cur.latents, raw)
    save_file({"latent_tensor": raw * 0.18215}, str(tmp_path / "legacy.latent"))
    legacy = read_latents(tmp_path / "legacy.latent")
    assert legacy.scaled and legacy.scaling(legacy.resolve_family()) == (0.18215, 0.0)
    save_file(
        {"latent_tensor": torch.zeros(1, 16, 2, 8, 8), "latent_format_version_0": torch.tensor([])},
        str(tmp_path / "video.latent"),
    )
    with pytest.raises(LatentFileError, match="5-D"):
        read_latents(tmp_path / "video.latent")


def test_npy_without_pickle(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((4, 8, 8), dtype=np.float16))
    batch = read_latents(tmp_path / "z.npy")
    assert batch.latents.shape == (1, 4, 8, 8) and batch.kind == "npy"
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LatentFileError, match="pickle"):
        read_latents(tmp_path / "obj.npy")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p.write_bytes(b""), "truncated"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "corrupt safetensors header"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"nope"), "not JSON"),
        (
            lambda p: save_file({"latents": torch.zeros(4, 8, 8)}, str(p)),
            r"\[batch, channels, height, width\]",
        ),
        (
            lambda p: save_file({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.int32)}, str(p)),
            "floating point",
        ),
        (lambda p: save_file({"latents": torch.zeros(0, 4, 8, 8)}, str(p)), "no samples"),
        (
            lambda p: save_file({"latents": torch.zeros(1, 4, 8, 8)}, str(p), metadata={"family": "sd9"}),
            "unknown family",
        ),
        (
            lambda p: save_file({"latents": torch.zeros(1, 4, 8, 8)}, str(p), metadata={"family": "flux"}),
            "flux has 16",
        ),
        (
            lambda p: save_file({"latents": torch.zeros(2, 4, 8, 8)}, str(p), metadata={"sources": '["a"]'}),
            "1 entries for 2",
        ),
        (
            lambda p: save_file({"latents": torch.zeros(1, 4, 8, 8)}, str(p), metadata={"parameters": "{"}),
            "not valid JSON",
        ),
        (
            lambda p: save_file({"latents": torch.zeros(1, 4, 8, 8)}, str(p), metadata={"scaled": "maybe"}),
            "true or false",
        ),
        (
            lambda p: save_file(
                {"latents": torch.zeros(1, 4, 8, 8)}, str(p), metadata={"scaling_factor": "0"}
            ),
            "not usable",
        ),
        (lambda p: save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, str(p)), "no 'latents' tensor"),
    ],
)
def test_bad_files_are_refused_naming_file_and_problem(tmp_path, make, problem):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(LatentFileError, match=problem) as info:
        read_latents(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_header_declaring_a_huge_shape_is_refused_before_reading(tmp_path):
    header = json.dumps(
        {"latents": {"dtype": "F32", "shape": [1 << 20, 4, 1 << 10, 1 << 10], "data_offsets": [0, 16]}}
    )
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\x00" * 16)
    with pytest.raises(LatentFileError, match="declares shape"):
        read_latents(path)


def test_pickle_files_are_never_loaded(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"\x80\x04")
    with pytest.raises(LatentFileError, match="never loaded"):
        read_latents(tmp_path / "x.pt")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_reader(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(data)
    with pytest.raises(LatentFileError):
        read_latents(path)
