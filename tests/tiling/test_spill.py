"""Spilled whole values: a region-addressed temporary file (or host memory) holds the values that do
not fit the budget, each step still runs once, and the output stays exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.tiling import (
    FIXED_OVERHEAD,
    SpillStore,
    TileSettings,
    decoder_program,
    default_store,
    encoder_program,
    minimum_budget,
    run_tiled,
)
from lib_vaebatch.tiling import spill as spill_mod
from lib_vaebatch.tiling.lean import run_lean, schedule
from lib_vaebatch.tiling.spill import DiskValue, SpillError
from tests.support import marked_latents, tensor_peak, tiny_autoencoder, tiny_backend
from tests.tiling.cases import program_case

TOL = 1e-3
LOTS = 1 << 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_disk_value_reads_back_what_was_written_region_by_region(tmp_path, dtype):
    data = torch.randn(2, 3, 10, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    value = DiskValue(tuple(data.shape), dtype, str(tmp_path))
    assert os.listdir(tmp_path) == [], "the file is unlinked at once: nothing to leave behind"
    assert value[:, :, 2:5, 1:4].abs().max().item() == 0, "never written reads as zeros"
    for ys, xs in [(slice(0, 4), slice(0, 7)), (slice(4, 10), slice(0, 3)), (slice(4, 10), slice(3, 7))]:
        value[:, :, ys, xs] = data[:, :, ys, xs]
    assert torch.equal(value.load(), data)
    assert torch.equal(value[:, :, 3:8, 2:6], data[:, :, 3:8, 2:6]), "a crop across the regions written"
    assert torch.equal(value[:, :, 1:9:2, ::2], data[:, :, 1:9:2, ::2]), "strided reads (fast mode's proxy)"
    with pytest.raises(ValueError, match="region"):
        value[:, :, 0:2, 0:2] = data[:, :, 0:3, 0:2]
    with pytest.raises(ValueError, match="whole along batch and channels"):
        value[:, 0:1, 0:2, 0:2]
    with pytest.raises(TypeError, match="slices"):
        value[:, :, 0, 0:2]
    value.close()
    with pytest.raises(SpillError, match=f"spill file in {tmp_path}"):
        value[:, :, 0:1, 0:1]


#: A child process whose spill files cannot grow past 4 KiB (RLIMIT_FSIZE; SIGXFSZ ignored, so a
#: write past it fails with EFBIG as a full disk fails with ENOSPC). The reference is decoded first.
FULL_DISK_CHILD = r"""
import json, resource, signal, sys
import torch
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.tiling import default_store, minimum_budget
from tests.support import marked_latents, tiny_backend

vae = tiny_backend(layers_per_block=1, seed=5)
latents = marked_latents(2, size=24)
reference = decode_latents(vae, latents, options=EngineOptions(tiling="never"))
least = minimum_budget(vae.tiling_program("decode"), latents[:1], spill=default_store(torch.device("cpu")))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
options = EngineOptions(tiling="always", memory_budget=least, max_chunk=1)
result = decode_latents(vae, latents, options=options)
diff = max(float((a - b).abs().max()) for a, b in zip(result.outputs, reference.outputs))
print(json.dumps({"ok": result.ok, "modes": [r.tile_mode for r in result.reports],
                  "events": result.events, "diff": diff}))
"""


def test_a_spill_store_that_cannot_be_written_costs_no_sample(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), spill_mod.SPILL_DIR_ENV: str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"], report
    # The first spill write fails for real; that sample runs again, and the job, without spilling.
    assert report["modes"] == ["exact-lean", "exact-lean"], report
    failed = [e for e in report["events"] if "without spilling" in e]
    assert len(failed) == 1 and f"spill file in {tmp_path}: File too large" in failed[0], report["events"]
    assert report["diff"] <= TOL
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["disk", "host"])
@pytest.mark.parametrize(
    ("layout", "op"), [("diffusers", "decode"), ("ldm", "decode"), ("diffusers", "encode")]
)
def test_spilling_keeps_the_output_exact_in_less_memory_for_less_work_than_recomputing(
    tmp_path, kind, layout, op
):
    program, x, ref, _module = program_case(layout, op)
    base = (12, 18)
    store = SpillStore(kind, LOTS, str(tmp_path))
    whole = schedule(program, base, 8)
    leanest = schedule(program, base, 8, leanest=True, spill=LOTS)
    recompute = schedule(program, base, 8, leanest=True)
    assert leanest.spills and leanest.label == "exact-spill" and leanest.spilled > 0
    assert not recompute.spills and recompute.lean
    assert leanest.peak < whole.peak / 2
    assert leanest.cost < recompute.cost, "each step runs once: cheaper than recomputation"
    mid = (leanest.peak + whole.peak) // 2
    for s in (leanest, schedule(program, base, 8, budget=mid, spill=LOTS)):
        assert s.peak <= max(mid, leanest.peak)
        with torch.no_grad():
            out = run_lean(program, x, s, spill=store)
        assert (out - ref).abs().max().item() <= TOL, s.segments
    assert os.listdir(tmp_path) == []


def test_without_a_store_or_room_in_it_nothing_is_spilled():
    program, _x, _ref, _module = program_case("diffusers", "decode")
    base = (12, 18)
    assert not schedule(program, base, 8, leanest=True).spills
    assert not schedule(program, base, 8, leanest=True, spill=1024).spills, "the store's limit is kept"
    roomy = schedule(program, base, 8, leanest=True, spill=LOTS)
    tight = schedule(program, base, 8, leanest=True, spill=roomy.spilled - 1)
    assert tight.spilled <= roomy.spilled - 1
    with pytest.raises(ValueError, match="spill store"):
        run_lean(program, _x, roomy)


def test_the_least_budget_with_a_store_is_lower_and_is_kept(tmp_path):
    program, x, _ref, _module = program_case("diffusers", "decode")
    store = SpillStore("disk", LOTS, str(tmp_path))
    least = minimum_budget(program, x)
    least_spill = minimum_budget(program, x, spill=store)
    assert least_spill < least
    settings = TileSettings(budget=least_spill, spill=store)
    with torch.no_grad():
        run_tiled(program, x, settings)
    assert settings.used_mode == "exact-spill" and settings.planned_bytes <= least_spill
    assert settings.spilled_bytes and settings.spilled_bytes > 0


@pytest.mark.parametrize("op", ["decode", "encode"])
def test_lean_fast_mode_gives_fast_modes_output_in_a_fraction_of_its_memory(tmp_path, monkeypatch, op):
    """Lean fast tiles (the stage's input, proxy and sample slabs in the store) compute the same
    statistics and tiles as fast tiles in memory, in a fraction of the CPU tensor memory the run
    really allocates (measured, not planned), with the spilled bytes written to the store's file."""
    vae = tiny_autoencoder(4, layers_per_block=1, seed=5)
    if op == "decode":
        program = decoder_program(vae.decoder, vae.post_quant_conv)
        x = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(4))
    else:
        program = encoder_program(vae.encoder, vae.quant_conv)
        x = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(4)) * 2 - 1
    store = SpillStore("disk", LOTS, str(tmp_path))
    written: list[int] = []
    write = DiskValue._write
    monkeypatch.setattr(DiskValue, "_write", lambda v, buf, at: (written.append(len(buf)), write(v, buf, at)))
    with torch.no_grad():
        in_memory = TileSettings(mode="fast", tile_size=8, leanest=True, budget=0)
        with tensor_peak() as whole:
            plain = run_tiled(program, x, in_memory)
        assert written == [], "without a store nothing is written"
        settings = TileSettings(mode="fast", tile_size=8, leanest=True, budget=0, spill=store)
        with tensor_peak() as lean:
            spilled = run_tiled(program, x, settings)
    assert settings.used_mode == "fast" and settings.spilled_bytes
    planned = settings.planned_bytes - FIXED_OVERHEAD  # type: ignore[operator]
    assert planned * 3 < in_memory.planned_bytes - FIXED_OVERHEAD  # type: ignore[operator]
    # Measured, not planned: the values really left memory for the file, and the run kept its plan.
    assert lean.peak * 3 < whole.peak, (lean, whole)
    assert lean.peak <= planned, (lean.peak, planned)
    assert sum(written) >= settings.spilled_bytes, "what the plan spills went through the file"
    assert (spilled - plain).abs().max().item() <= 1e-4
    assert os.listdir(tmp_path) == []


def test_lean_fast_keeps_in_memory_the_sample_tiles_the_budget_holds_and_parks_the_rest(
    tmp_path, monkeypatch
):
    """Between the leanest fast plan (every sample tile parked) and fast in memory, the planner
    keeps some sample tiles' slabs in memory; those are never parked, and the output is unchanged."""
    from lib_vaebatch.tiling import fast as fast_mod
    from lib_vaebatch.tiling import plan as make_plan

    vae = tiny_autoencoder(4, layers_per_block=1, seed=5)
    program = decoder_program(vae.decoder, vae.post_quant_conv)
    x = torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(4))
    store = SpillStore("disk", LOTS, str(tmp_path))
    leanest = make_plan(
        program, x, TileSettings(mode="fast", tile_size=8, leanest=True, budget=0, spill=store)
    )
    in_memory = make_plan(program, x, TileSettings(mode="fast", tile_size=8, budget=LOTS))
    assert leanest.lean and leanest.resident == 0 and not in_memory.lean
    budget = (leanest.planned_bytes + in_memory.planned_bytes) // 2
    settings = TileSettings(mode="fast", tile_size=8, budget=budget, spill=store)
    chosen = make_plan(program, x, settings)
    assert chosen.lean and chosen.resident > 0 and chosen.planned_bytes <= budget
    parked: list[int] = []
    original = fast_mod._park
    monkeypatch.setattr(
        fast_mod, "_park", lambda run, tile, value: (parked.append(value), original(run, tile, value))
    )
    with torch.no_grad():
        with tensor_peak() as whole:
            reference = run_tiled(program, x, TileSettings(mode="fast", tile_size=8, budget=LOTS))
        with tensor_peak() as measured:
            out = run_tiled(program, x, settings)
    # measured: the parked slabs left memory. The tensor model is within 1% here (the fixed overhead
    # in planned_bytes covers the allocator's share); parking none would take the run to ``whole``.
    model = chosen.planned_bytes - FIXED_OVERHEAD
    assert measured.peak <= 1.05 * model < whole.peak, (measured, model, whole)
    first, last = chosen.segment  # type: ignore[misc]
    cores = 25  # a 40² latent in tiles of 8
    n_sampled = len(fast_mod.sample_tiles(5, cores // 5))
    assert len(parked) == (n_sampled - chosen.resident) * (last - first + 1)
    assert (out - reference).abs().max().item() <= 1e-4
    assert os.listdir(tmp_path) == []


def test_the_engine_spills_to_the_spill_directory_and_says_so(tmp_path, monkeypatch):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    monkeypatch.setenv(spill_mod.SPILL_DIR_ENV, str(spill_dir))
    assert default_store(torch.device("cpu")).directory == str(spill_dir)  # type: ignore[union-attr]
    made: list[str | None] = []
    original = DiskValue.__init__

    def spy(self, shape, dtype, directory=None):  # type: ignore[no-untyped-def]
        made.append(directory)
        original(self, shape, dtype, directory)

    monkeypatch.setattr(DiskValue, "__init__", spy)
    vae = tiny_backend(layers_per_block=1, seed=5)
    latents = marked_latents(2, size=24)
    reference = decode_latents(vae, latents, options=EngineOptions(tiling="never"))
    z = latents[:1]
    program = vae.tiling_program("decode")
    least = minimum_budget(program, z, spill=default_store(torch.device("cpu")))
    result = decode_latents(
        vae, latents, options=EngineOptions(tiling="always", memory_budget=least, max_chunk=1)
    )
    assert result.ok and [r.tile_mode for r in result.reports] == ["exact-spill", "exact-spill"]
    assert "exact-spill ×2" in result.summary()
    assert made and set(made) == {str(spill_dir)}
    assert list(spill_dir.iterdir()) == []
    for a, b in zip(result.outputs, reference.outputs, strict=True):
        assert (a - b).abs().max().item() <= TOL
    off = decode_latents(
        vae, latents[:1], options=EngineOptions(tiling="always", memory_budget=least, spill=False)
    )
    assert off.ok and off.reports[0].tile_mode == "exact-lean", "spilling off: recomputed instead"


@pytest.mark.parametrize(
    "op",
    [
        "decode",
        pytest.param(
            "encode",
            marks=pytest.mark.xfail(
                strict=True,
                reason="known gap (found by mutation testing, 2026-12-07): an encode's schedule plans "
                "3,538,944 spilled bytes at this size but holds 5,308,416 in the store at once (1.5x); "
                "the store's byte limit can be passed by that much",
            ),
        ),
    ],
)
def test_the_planned_spilled_bytes_are_what_the_store_holds_at_its_fullest(tmp_path, monkeypatch, op):
    """``Schedule.spilled`` (reported as ``spilled_bytes``, and what the store's limit is checked
    against) equals the most bytes the disk store held at once during the run."""
    program, x, _ref, _module = program_case("diffusers", op)
    live: dict[int, int] = {}
    fullest = [0]
    init, close = DiskValue.__init__, DiskValue.close

    def counted_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        live[id(self)] = self.nbytes
        fullest[0] = max(fullest[0], sum(live.values()))

    def counted_close(self):
        live.pop(id(self), None)
        close(self)

    monkeypatch.setattr(DiskValue, "__init__", counted_init)
    monkeypatch.setattr(DiskValue, "close", counted_close)
    s = schedule(program, (12, 18), 8, leanest=True, spill=LOTS)
    with torch.no_grad():
        run_lean(program, x, s, spill=SpillStore("disk", LOTS, str(tmp_path)))
    assert s.spilled > 0 and fullest[0] == s.spilled
