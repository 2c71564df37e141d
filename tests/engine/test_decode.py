"""Batch decode: equivalence across chunkings, NaN recovery, out-of-memory recovery, cancel."""

from __future__ import annotations

import pytest
import torch

from bench.baselines import a1111_decode_latent_batch
from lib_vaebatch.engine.decode import InputError, check_latents, decode_latents
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.engine.planner import estimate_bytes
from lib_vaebatch.engine.results import Status
from lib_vaebatch.families import to_raw
from tests.support import (
    OVERFLOWS,
    OOMAbove,
    Recorder,
    identify,
    marked_latents,
    overflowing_backend,
    tiny_backend,
)

#: The default ladder plus fp64, so that a fp32 VAE has a rung to recover in (see OVERFLOWS).
LADDER = ("bf16", "fp32", "fp64")


@pytest.fixture(scope="module")
def vae():
    return tiny_backend()


def _stack(result):
    assert all(o is not None for o in result.outputs)
    return torch.stack(result.outputs)


def test_chunked_equals_per_sample_equals_whole_batch(vae):
    latents = marked_latents(7)
    rec = Recorder(vae)
    chunked = decode_latents(rec, latents, options=EngineOptions(max_chunk=3))
    assert chunked.chunk_sizes == [3, 3, 1]
    per_sample = decode_latents(vae, latents, options=EngineOptions(chunk_mode="per-sample"))
    assert per_sample.chunk_sizes == [1] * 7
    with torch.no_grad():
        whole = vae.decode(to_raw(latents, vae.scaling_factor, vae.shift_factor))
    assert (_stack(chunked) - whole).abs().max() <= 1e-5
    assert (_stack(per_sample) - whole).abs().max() <= 1e-5
    assert all(r.status is Status.OK and r.dtype == "fp32" for r in chunked.reports)


def test_per_sample_mode_reproduces_a1111_loop_exactly(vae):
    latents = marked_latents(4)
    ours = decode_latents(vae, latents, options=EngineOptions(chunk_mode="per-sample"))
    ref = a1111_decode_latent_batch(vae, latents)
    for a, b in zip(ours.outputs, ref, strict=True):
        assert a is not None
        assert a.device.type == "cpu"
        assert torch.equal(a, b.float())


@pytest.mark.usefixtures("cpu_chunks_by_memory")
def test_cpu_chunks_are_planned_by_memory(vae):
    # Batching pays on the CPU too (issue 13), so memory alone bounds the chunk there.
    latents = marked_latents(3)
    whole = decode_latents(vae, latents, options=EngineOptions(memory_budget=1 << 40))
    assert whole.chunk_sizes == [3]
    pixels = latents.shape[-2] * latents.shape[-1] * vae.downscale**2
    one = vae.fixed_bytes("decode") + estimate_bytes(vae, "decode", pixels, vae.dtype)
    tight = decode_latents(vae, latents, options=EngineOptions(memory_budget=one))
    assert tight.chunk_sizes == [1, 1, 1]


def test_the_cpu_chunk_cap_from_the_environment(vae, monkeypatch):
    monkeypatch.setenv("VAEBATCH_CPU_CHUNK", "2")
    assert decode_latents(vae, marked_latents(3)).chunk_sizes == [2, 1]
    monkeypatch.setenv("VAEBATCH_CPU_CHUNK", "not a number")
    assert decode_latents(vae, marked_latents(3)).chunk_sizes == [3]


@pytest.mark.parametrize("ov", OVERFLOWS)
def test_nan_from_overflow_is_recovered_and_only_those_samples_rerun(ov):
    low, high = ov.names
    vae = overflowing_backend()
    latents = marked_latents(6, scale=0.5)
    latents[1] *= ov.factor  # these two overflow in ov.dtype (and not in ov.rung)
    latents[4] *= ov.factor
    vae.set_dtype(torch.float64)
    reference = decode_latents(vae, latents, options=EngineOptions(max_chunk=2))
    assert all(r.status is Status.OK for r in reference.reports), "fp64 reference must be finite"

    vae.set_dtype(ov.dtype)
    rec = Recorder(vae)
    opts = EngineOptions(max_chunk=2, escalate_remaining=False, ladder=LADDER)
    result = decode_latents(rec, latents, options=opts)

    statuses = [r.status for r in result.reports]
    assert statuses == [Status.OK, Status.RECOVERED, Status.OK, Status.OK, Status.RECOVERED, Status.OK]
    assert result.reports[1].dtype == high and f"non-finite in {low}" in result.reports[1].message
    # Each sample decoded once, the two overflowing ones once more (in the rung), nothing else.
    seen = identify(rec.decoded_markers(), latents, vae.scaling_factor)
    assert sorted(seen) == [0, 1, 1, 2, 3, 4, 4, 5]
    redecoded = [
        i
        for calls in rec.calls
        if calls[1] == ov.rung
        for i in identify(calls[2], latents, vae.scaling_factor)
    ]
    assert sorted(redecoded) == [1, 4]
    for i in range(6):
        out = result.outputs[i]
        assert out is not None and torch.isfinite(out).all()
        assert (out - reference.outputs[i]).abs().max() < 0.1  # fp16/bf16/fp32 vs fp64
    assert vae.dtype == ov.dtype, "the original precision is restored after the job"
    assert result.summary() == f"chunk 2, recovered {high} ×2"


@pytest.mark.parametrize("ov", OVERFLOWS)
def test_escalation_runs_the_rest_in_the_recovered_precision_and_can_stick(ov):
    high = ov.names[1]
    vae = overflowing_backend()
    latents = marked_latents(4, scale=0.5)
    latents[0] *= ov.factor
    vae.set_dtype(ov.dtype)
    rec = Recorder(vae)
    result = decode_latents(
        rec,
        latents,
        options=EngineOptions(chunk_mode="per-sample", keep_recovered_dtype=True, ladder=LADDER),
    )
    assert [r.dtype for r in result.reports] == [high] * 4
    assert [r.status for r in result.reports] == [Status.RECOVERED, Status.OK, Status.OK, Status.OK]
    assert len(rec.calls) == 5  # sample 0 twice, then 1..3 straight in the recovered precision
    assert vae.dtype == ov.rung, "keep_recovered_dtype leaves the VAE in the recovered precision"


def test_partial_nan_anywhere_in_a_sample_is_caught(vae):
    class PoisonOnePixel(Recorder):
        def decode(self, latents):
            out = super().decode(latents).clone()
            out[:, 2, -1, -1] = float("inf")  # the last element, not the first
            return out

    result = decode_latents(PoisonOnePixel(vae), marked_latents(2), options=EngineOptions(ladder=()))
    assert [r.status for r in result.reports] == [Status.FAILED, Status.FAILED]
    assert "Inf: 1" in result.reports[0].message
    assert "no more robust precision" in result.reports[0].message


@pytest.mark.parametrize("ov", OVERFLOWS)
def test_sample_that_stays_non_finite_fails_alone_and_others_are_kept(ov):
    vae = overflowing_backend()
    latents = marked_latents(3, scale=0.5)
    latents[1] *= ov.factor
    vae.set_dtype(ov.dtype)
    result = decode_latents(vae, latents, options=EngineOptions(ladder=()))
    assert [r.status for r in result.reports] == [Status.OK, Status.FAILED, Status.OK]
    assert result.outputs[1] is None and result.outputs[0] is not None and result.outputs[2] is not None
    assert "NaN" in result.reports[1].message


def test_ladder_never_goes_down_in_precision(vae):
    class AlwaysNaN(Recorder):
        def decode(self, latents):
            return super().decode(latents) * float("nan")

    rec = AlwaysNaN(vae)  # fp32 VAE: bf16 is below it, so nothing is retried
    result = decode_latents(rec, marked_latents(1), options=EngineOptions(ladder=("bf16", "fp32")))
    assert len(rec.calls) == 1
    assert result.reports[0].status is Status.FAILED


def test_oom_halves_the_chunk_and_keeps_finished_samples(vae):
    latents = marked_latents(9)
    reference = decode_latents(vae, latents)
    oom = OOMAbove(vae, limit=2)
    result = decode_latents(oom, latents, options=EngineOptions(max_chunk=8))
    assert result.ok
    assert result.chunk_sizes[0] == 2 and max(result.chunk_sizes) == 2
    assert any("out of memory at chunk 8" in e for e in result.events)
    assert any("out of memory at chunk 4" in e for e in result.events)
    for a, b in zip(result.outputs, reference.outputs, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    seen = identify(oom.decoded_markers(), latents, vae.scaling_factor)
    assert sorted(seen) == list(range(9)), "each sample decoded exactly once"


def test_oom_mid_batch_keeps_samples_decoded_before_it(vae):
    class OOMOnSecondChunk(Recorder):
        def decode(self, latents):
            if len(self.calls) == 1 and latents.shape[0] > 1:
                self.calls.append((0, self.dtype, []))
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
            return super().decode(latents)

    rec = OOMOnSecondChunk(vae)
    latents = marked_latents(6)
    result = decode_latents(rec, latents, options=EngineOptions(max_chunk=3))
    assert result.ok
    seen = identify(rec.decoded_markers(), latents, vae.scaling_factor)
    assert seen.count(0) == 1 and seen.count(1) == 1 and seen.count(2) == 1, "chunk 1 was not redone"
    assert sorted(seen) == list(range(6))


def test_oom_at_chunk_one_hands_over_to_tiled_decode(vae):
    oom = OOMAbove(vae, limit=0, tiling=True)
    result = decode_latents(oom, marked_latents(3), options=EngineOptions(max_chunk=2))
    assert result.ok
    assert oom.tiled_calls == 3
    assert all(r.tiled for r in result.reports)
    assert "tiled ×3" in result.summary()


def test_oom_at_chunk_one_without_tiling_fails_only_those_samples(vae):
    oom = OOMAbove(vae, limit=0, tiling=False)
    result = decode_latents(oom, marked_latents(2))
    assert [r.status for r in result.reports] == [Status.FAILED, Status.FAILED]
    assert "out of memory at chunk size 1" in result.reports[0].message


def test_other_errors_in_a_chunk_are_isolated_to_the_sample(vae):
    latents = marked_latents(4)

    class BreaksOnSample2(Recorder):
        def decode(self, z):
            if any(
                abs(v - latents[2, 0, 0, 0].item() / vae.scaling_factor) < 1e-4
                for v in z[:, 0, 0, 0].tolist()
            ):
                raise RuntimeError("bad sample")
            return super().decode(z)

    result = decode_latents(BreaksOnSample2(vae), latents, options=EngineOptions(max_chunk=4))
    assert [r.status for r in result.reports] == [Status.OK, Status.OK, Status.FAILED, Status.OK]
    assert "RuntimeError: bad sample" in result.reports[2].message


def test_cancel_returns_the_finished_samples(vae):
    latents = marked_latents(5)
    seen = []

    def progress(done, total, text):
        seen.append(done)

    result = decode_latents(
        vae, latents, options=EngineOptions(max_chunk=1), progress=progress, cancel=lambda: len(seen) >= 2
    )
    assert result.cancelled
    assert [r.status for r in result.reports] == [
        Status.OK,
        Status.OK,
        Status.CANCELLED,
        Status.CANCELLED,
        Status.CANCELLED,
    ]
    assert result.outputs[0] is not None and result.outputs[1] is not None and result.outputs[2] is None
    assert seen == [1, 2]


def test_on_sample_streams_and_keep_outputs_false_holds_nothing(vae):
    got = []
    result = decode_latents(
        vae, marked_latents(3), on_sample=lambda i, x, r: got.append((i, x.shape)), keep_outputs=False
    )
    assert [i for i, _ in got] == [0, 1, 2]
    assert result.outputs == [None, None, None] and result.ok


@pytest.mark.parametrize(
    ("value", "word"), [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")]
)
def test_non_finite_latents_are_rejected_naming_the_sample(vae, value, word):
    latents = marked_latents(4)
    latents[2, 1, 3, 3] = value
    with pytest.raises(InputError, match=rf"sample 2: latents contain {word}") as info:
        decode_latents(vae, latents)
    assert info.value.index == 2


def test_wrong_channels_and_shapes_are_rejected(vae):
    with pytest.raises(InputError, match="16 channels but the VAE takes 4"):
        check_latents(torch.zeros(1, 16, 8, 8), 4)
    with pytest.raises(InputError, match="shape"):
        check_latents(torch.zeros(4, 8, 8), 4)
    with pytest.raises(InputError, match="floating point"):
        check_latents(torch.zeros(1, 4, 8, 8, dtype=torch.int64), 4)


def test_16_channel_vae_decodes():
    vae = tiny_backend(16, family="sd3")
    result = decode_latents(vae, marked_latents(2, channels=16))
    assert result.ok and result.outputs[0].shape == (3, 64, 64)
