"""The CPU memory layout chosen by measurement: the probe's decision logic (a controllable clock),
outputs equal to the plain decode, weights restored after the job, no inference tensors leaking."""

from __future__ import annotations

import pytest
import torch

from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.encode import encode_pixels
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.families import to_raw
from lib_vaebatch.layout import (
    CHANNELS_LAST,
    CONTIGUOUS,
    CPU_CANDIDATES,
    Layout,
    LayoutScope,
    LayoutTuner,
)
from tests.support import marked_latents, tiny_backend

CL = torch.channels_last

#: Chunks as the engine plans them on the CPU (by memory), not the suite's one sample at a time.
pytestmark = pytest.mark.usefixtures("cpu_chunks_by_memory")


class LayoutClock:
    """A clock that advances, per decoder call, by the cost of the layout that call really ran in
    (read off the first conv's weight and input as they arrive): a VAE whose two layouts differ in
    speed, without timing anything."""

    def __init__(self, module: torch.nn.Module, *, channels_last: float, contiguous: float) -> None:
        self.now = 0.0
        self.cost = {True: channels_last, False: contiguous}
        self.seen: list[bool] = []
        module.decoder.conv_in.register_forward_pre_hook(self._hook)

    def _hook(self, mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        cl = mod.weight.is_contiguous(memory_format=CL) and args[0].is_contiguous(memory_format=CL)
        self.seen.append(cl)
        self.now += self.cost[cl]

    def __call__(self) -> float:
        return self.now


def _tuned(channels_last: float, contiguous: float, **kw):
    vae = tiny_backend()
    clock = LayoutClock(vae.module, channels_last=channels_last, contiguous=contiguous)
    vae.tuner = LayoutTuner(clock=clock, **kw)
    return vae, clock


def _key(shape=(1, 4, 8, 8)):
    return ("decode", shape, torch.float32, torch.device("cpu"))


# -- the decision --------------------------------------------------------------------------------
def test_probe_times_each_layout_twice_back_and_forth_then_keeps_the_fastest():
    now = [0.0]
    tuner = LayoutTuner(clock=lambda: now[0])
    m, key = torch.nn.Linear(1, 1), _key()
    order = []
    for seconds in (1.0, 3.0, 2.5, 1.2):  # channels-last, contiguous, contiguous, channels-last
        layout = tuner.next_layout(m, key)
        order.append(layout)
        assert tuner.decision(m, key) is None
        tuner.record(m, key, layout, seconds)
    assert order == [CHANNELS_LAST, CONTIGUOUS, CONTIGUOUS, CHANNELS_LAST]
    assert tuner.decision(m, key) is CHANNELS_LAST
    assert tuner.next_layout(m, key) is CHANNELS_LAST


def test_probe_decides_by_each_layouts_fastest_call():
    tuner, m, key = LayoutTuner(), torch.nn.Linear(1, 1), _key()
    # channels-last's first call paid a set-up cost (9 s); its best call (1.5) still loses to 1.0.
    for seconds in (9.0, 1.0, 1.1, 1.5):
        tuner.record(m, key, tuner.next_layout(m, key), seconds)
    assert tuner.decision(m, key) is CONTIGUOUS


def test_a_close_call_is_timed_for_more_rounds_until_clear_or_the_limit():
    tuner, m, key = LayoutTuner(max_rounds=4), torch.nn.Linear(1, 1), _key()
    for seconds in (1.0, 1.05, 1.04, 1.02):  # 2-5% apart: not settled
        tuner.record(m, key, tuner.next_layout(m, key), seconds)
    assert tuner.decision(m, key) is None
    order = []
    for seconds in (0.6, 1.0):  # round 3: channels-last really is faster
        layout = tuner.next_layout(m, key)
        order.append(layout)
        tuner.record(m, key, layout, seconds)
    assert order == [CHANNELS_LAST, CONTIGUOUS]
    assert tuner.decision(m, key) is CHANNELS_LAST
    stubborn = torch.nn.Linear(1, 1)
    for _ in range(8):  # always 3% apart: decided after max_rounds all the same
        layout = tuner.next_layout(stubborn, key)
        tuner.record(stubborn, key, layout, 0.97 if layout is CHANNELS_LAST else 1.0)
    assert tuner.decision(stubborn, key) is CHANNELS_LAST


def test_a_tie_within_the_margin_keeps_channels_last_whose_outputs_match_the_plain_decode():
    tuner, m, key = LayoutTuner(margin=0.05, max_rounds=2), torch.nn.Linear(1, 1), _key()
    assert tuner.prefer is CHANNELS_LAST
    for seconds in (1.0, 0.97, 0.98, 1.0):  # contiguous 3% faster: inside the 5% margin
        tuner.record(m, key, tuner.next_layout(m, key), seconds)
    assert tuner.decision(m, key) is CHANNELS_LAST
    clear = torch.nn.Linear(1, 1)
    for seconds in (1.0, 0.90, 0.91, 1.0):  # contiguous 10% faster: beyond the margin
        tuner.record(clear, key, tuner.next_layout(clear, key), seconds)
    assert tuner.decision(clear, key) is CONTIGUOUS


def test_the_preferred_layout_can_be_chosen_and_must_be_a_candidate():
    tuner, m, key = LayoutTuner(margin=0.05, max_rounds=2, prefer=CONTIGUOUS), torch.nn.Linear(1, 1), _key()
    for seconds in (0.97, 1.0, 1.0, 0.98):  # channels-last 3% faster: inside the 5% margin
        tuner.record(m, key, tuner.next_layout(m, key), seconds)
    assert tuner.decision(m, key) is CONTIGUOUS
    assert LayoutTuner([CONTIGUOUS]).prefer is CONTIGUOUS
    with pytest.raises(ValueError, match="not a candidate"):
        LayoutTuner([CONTIGUOUS], prefer=CHANNELS_LAST)


def test_each_shape_dtype_and_module_is_probed_on_its_own():
    tuner, a, b = LayoutTuner(rounds=1), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    for seconds in (1.0, 2.0):
        tuner.record(a, _key(), tuner.next_layout(a, _key()), seconds)
    assert tuner.decision(a, _key()) is CHANNELS_LAST
    assert tuner.decision(a, _key((1, 4, 16, 16))) is None
    assert tuner.decision(b, _key()) is None
    assert tuner.next_layout(b, _key()) is CHANNELS_LAST  # first of b's own schedule
    fp16 = ("decode", (1, 4, 8, 8), torch.float16, torch.device("cpu"))
    assert tuner.decision(a, fp16) is None
    tuner.forget(a)
    assert tuner.decision(a, _key()) is None


def test_a_timing_for_a_layout_not_scheduled_is_ignored():
    tuner, m, key = LayoutTuner(rounds=1), torch.nn.Linear(1, 1), _key()
    tuner.record(m, key, CONTIGUOUS, 0.1)  # the schedule starts with channels-last
    assert tuner.next_layout(m, key) is CHANNELS_LAST
    tuner.record(m, key, CHANNELS_LAST, 2.0)
    tuner.record(m, key, CONTIGUOUS, 1.0)
    assert tuner.decision(m, key) is CONTIGUOUS


def test_a_batch_is_also_timed_one_sample_at_a_time_and_the_fastest_form_is_kept():
    tuner, key = LayoutTuner(max_rounds=2), _key((4, 4, 8, 8))
    cl_each, cont_each = CHANNELS_LAST.one_at_a_time(), CONTIGUOUS.one_at_a_time()
    assert tuner.candidates_for(key) == (CONTIGUOUS, CHANNELS_LAST, cont_each, cl_each)
    assert tuner.candidates_for(_key()) == (CONTIGUOUS, CHANNELS_LAST)  # one sample: nothing to split
    assert LayoutTuner(per_sample=False).candidates_for(key) == (CONTIGUOUS, CHANNELS_LAST)
    cost = {CONTIGUOUS: 5.0, CHANNELS_LAST: 4.0, cont_each: 4.2, cl_each: 3.0}
    m, order = torch.nn.Linear(1, 1), []
    while tuner.decision(m, key) is None:
        layout = tuner.next_layout(m, key)
        order.append(layout)
        tuner.record(m, key, layout, cost[layout])
    first_round = [CHANNELS_LAST, cont_each, cl_each, CONTIGUOUS]
    assert order == first_round + first_round[::-1]
    assert tuner.decision(m, key) == cl_each and cl_each.per_sample and cl_each.channels_last
    batched = torch.nn.Linear(1, 1)  # the batched call faster: channels-last, whole
    cost = {CONTIGUOUS: 5.0, CHANNELS_LAST: 3.0, cont_each: 6.0, cl_each: 4.0}
    while tuner.decision(batched, key) is None:
        layout = tuner.next_layout(batched, key)
        tuner.record(batched, key, layout, cost[layout])
    assert tuner.decision(batched, key) is CHANNELS_LAST


def test_a_tie_between_forms_prefers_channels_last_whole_then_channels_last_per_sample():
    tuner, key = LayoutTuner(margin=0.05, max_rounds=2), _key((2, 4, 8, 8))
    cl_each, cont_each = CHANNELS_LAST.one_at_a_time(), CONTIGUOUS.one_at_a_time()
    for costs, want in (
        ({"contiguous": 1.0, "channels-last": 1.02, "contiguous per sample": 0.99}, CHANNELS_LAST),
        ({"contiguous": 1.5, "channels-last": 1.5, "contiguous per sample": 0.99}, cl_each),
        ({"contiguous": 1.5, "channels-last": 1.5, "contiguous per sample": 0.80}, cont_each),
    ):
        m = torch.nn.Linear(1, 1)
        while tuner.decision(m, key) is None:
            layout = tuner.next_layout(m, key)
            tuner.record(m, key, layout, costs.get(layout.name, 1.0))  # channels-last per sample: 1.0
        assert tuner.decision(m, key) == want, costs


def test_extra_rounds_time_only_the_forms_still_in_the_running():
    tuner, key = LayoutTuner(max_rounds=4), _key((4, 4, 8, 8))
    cl_each, cont_each = CHANNELS_LAST.one_at_a_time(), CONTIGUOUS.one_at_a_time()
    # the two whole-batch forms 3% apart (not settled), the per-sample forms 40-60% slower
    cost = {CONTIGUOUS: 1.03, CHANNELS_LAST: 1.0, cont_each: 1.6, cl_each: 1.4}
    m, order = torch.nn.Linear(1, 1), []
    while tuner.decision(m, key) is None:
        layout = tuner.next_layout(m, key)
        order.append(layout)
        tuner.record(m, key, layout, cost[layout])
    assert len(order) == 2 * 4 + 2 * 2  # two rounds of four, then two rounds of the close two
    assert set(order[8:]) == {CONTIGUOUS, CHANNELS_LAST}
    assert tuner.decision(m, key) is CHANNELS_LAST


class BatchClock:
    """A clock that advances per decoder call by ``cost(batch)`` of the call's input: a VAE whose
    batched call is slower (or faster) per sample than one sample at a time, timing nothing."""

    def __init__(self, module: torch.nn.Module, cost) -> None:
        self.now, self.cost, self.batches = 0.0, cost, []
        module.decoder.conv_in.register_forward_pre_hook(self._hook)

    def _hook(self, mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.batches.append(args[0].shape[0])
        self.now += self.cost(args[0].shape[0])

    def __call__(self) -> float:
        return self.now


def _plain_channels_last(latents: torch.Tensor, *, per_sample: bool) -> torch.Tensor:
    """The plain channels-last decode (a fresh module with the same weights): the whole batch at
    once, or one sample at a time."""
    other = tiny_backend()
    torch.nn.Module.to(other.module, memory_format=CL)
    with torch.inference_mode():
        z = to_raw(latents, other.scaling_factor, other.shift_factor).contiguous(memory_format=CL)
        parts = z.split(1) if per_sample else [z]
        return torch.cat([other.module.decode(p).sample for p in parts]).clone()


@pytest.mark.parametrize("per_sample_faster", [True, False])
def test_an_auto_batch_runs_the_faster_of_batched_and_per_sample_and_equals_that_plain_decode(
    per_sample_faster,
):
    vae = tiny_backend()
    cost = (lambda b: float(b * b)) if per_sample_faster else (lambda b: 1.0 + 0.1 * b)
    clock = BatchClock(vae.module, cost)
    vae.tuner = LayoutTuner(clock=clock, max_rounds=2)
    latents = marked_latents(3, size=16)
    for _ in range(8):  # one chunk of 3 per job: eight probe calls, then the decision
        result = decode_latents(vae, latents)
        assert result.ok and result.chunk_sizes == [3]
    decision = vae.tuner.decision(vae.module, _key((3, 4, 16, 16)))
    assert decision is not None and decision.channels_last  # the layouts cost alike: channels-last
    assert decision.per_sample is per_sample_faster
    clock.batches.clear()
    result = decode_latents(vae, latents)
    assert clock.batches == ([1, 1, 1] if per_sample_faster else [3])
    plain = _plain_channels_last(latents, per_sample=per_sample_faster)
    for out, ref in zip(result.outputs, plain, strict=True):
        assert torch.equal(out, ref)
        assert out.is_contiguous() and not out.is_inference()


def test_one_candidate_needs_no_probe():
    only = Layout("only", channels_last=False, inference_mode=True)
    tuner = LayoutTuner([only])
    assert tuner.next_layout(torch.nn.Linear(1, 1), _key()) is only


@pytest.mark.parametrize(("cl_cost", "contiguous_cost", "winner"), [(1.0, 3.0, True), (3.0, 1.0, False)])
def test_the_engine_runs_the_layout_that_really_ran_faster(cl_cost, contiguous_cost, winner):
    vae, clock = _tuned(cl_cost, contiguous_cost)
    one = EngineOptions(max_chunk=1)  # one call per sample, so each call is one probe step
    result = decode_latents(vae, marked_latents(7, size=8), options=one)
    assert result.ok
    # Four timed calls (channels-last, contiguous, contiguous, channels-last), then the winner.
    assert clock.seen[:4] == [True, False, False, True]
    assert clock.seen[4:] == [winner] * 3
    key = _key()
    assert vae.tuner.decision(vae.module, key).channels_last is winner
    # The decision is kept for the next job (no new probe) ...
    clock.seen.clear()
    decode_latents(vae, marked_latents(2, size=8), options=one)
    assert clock.seen == [winner] * 2
    # ... and a new shape is probed again: another size, or a chunk of another batch size.
    clock.seen.clear()
    decode_latents(vae, marked_latents(1, size=16))
    assert clock.seen == [True]
    clock.seen.clear()
    decode_latents(vae, marked_latents(2, size=8))
    assert clock.seen == [True]


# -- outputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["channels-last", "contiguous", "auto"])
def test_outputs_equal_the_plain_decode(layout):
    vae = tiny_backend()
    seen: list[bool] = []
    if layout == "auto":
        # the real probe (the suite pins the default tuner to one layout), on the wall clock:
        # whichever layout and form it runs, each output equals the plain decode
        vae.tuner = LayoutTuner(CPU_CANDIDATES)
        vae.module.decoder.conv_in.register_forward_pre_hook(
            lambda mod, args: seen.append(mod.weight.is_contiguous(memory_format=CL))
        )
    latents = marked_latents(5, size=16)
    with torch.no_grad():
        plain = vae.module.decode(to_raw(latents, vae.scaling_factor, vae.shift_factor)).sample
    seen.clear()
    for _ in range(3 if layout == "auto" else 1):  # the probe's calls, then its decision's
        result = decode_latents(vae, latents, options=EngineOptions(cpu_layout=layout))
        for out, ref in zip(result.outputs, plain, strict=True):
            assert (out - ref).abs().max().item() <= 1e-5
            assert out.is_contiguous() and not out.is_inference()
    if layout == "auto":
        assert set(seen) == {True, False}, "both layouts ran"


def test_channels_last_outputs_equal_a_plain_channels_last_decode():
    vae = tiny_backend()
    latents = marked_latents(3, size=16)
    result = decode_latents(vae, latents, options=EngineOptions(cpu_layout="channels-last"))
    assert result.chunk_sizes == [3]
    other = tiny_backend()  # same seed, same weights
    torch.nn.Module.to(other.module, memory_format=CL)
    with torch.inference_mode():
        z = to_raw(latents, vae.scaling_factor, vae.shift_factor).contiguous(memory_format=CL)
        plain = other.module.decode(z).sample  # the whole batch at once, as the plain decode does
    for out, ref in zip(result.outputs, plain, strict=True):
        assert torch.equal(out, ref)


def test_an_auto_job_whose_layouts_tie_equals_the_plain_channels_last_decode_bit_for_bit():
    vae, clock = _tuned(1.0, 1.0, max_rounds=2)  # the two layouts take the same time
    latents = marked_latents(3, size=16)
    one = EngineOptions(max_chunk=1)
    for _ in range(2):  # four probe calls (CL, contiguous, contiguous, CL), then the decision
        result = decode_latents(vae, latents, options=one)
    assert vae.tuner.decision(vae.module, _key((1, 4, 16, 16))) is CHANNELS_LAST
    assert clock.seen[-3:] == [True] * 3
    other = tiny_backend()  # same seed, same weights
    torch.nn.Module.to(other.module, memory_format=CL)
    for i, out in enumerate(result.outputs):
        with torch.inference_mode():
            z = to_raw(latents[i : i + 1], vae.scaling_factor, vae.shift_factor).contiguous(memory_format=CL)
            ref = other.module.decode(z).sample[0]
        assert torch.equal(out, ref)


def test_channels_last_encode_equals_the_plain_encode():
    vae = tiny_backend()
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ours = encode_pixels(vae, pixels, options=EngineOptions(cpu_layout="channels-last"))
    with torch.no_grad():
        ref = vae.module.encode(pixels).latent_dist.mean * vae.scaling_factor
    got = torch.stack(ours.outputs)
    assert (got - ref).abs().max().item() <= 1e-5
    assert not got.is_inference()


def test_outputs_can_be_modified_in_place_with_autograd_on():
    vae = tiny_backend()
    result = decode_latents(vae, marked_latents(2, size=8), options=EngineOptions(cpu_layout="channels-last"))
    out = result.outputs[0]
    out.add_(1.0).clamp_(0, 2)  # raises for an inference tensor outside inference mode
    w = torch.ones(1, requires_grad=True)
    (out.sum() * w).backward()
    assert w.grad is not None


def test_tiles_in_a_channels_last_job_run_on_the_original_weights_and_match():
    vae = tiny_backend()
    latents = marked_latents(2, size=32)
    tiled = decode_latents(
        vae, latents, options=EngineOptions(cpu_layout="channels-last", tiling="always", tile_size=16)
    )
    # Tiles run one sample at a time; so does the reference (a batched conv rounds differently).
    plain = decode_latents(vae, latents, options=EngineOptions(cpu_layout="contiguous", max_chunk=1))
    assert all(r.tiled for r in tiled.reports)
    for a, b in zip(tiled.outputs, plain.outputs, strict=True):
        assert (a - b).abs().max().item() <= 1e-5


# -- the module after the job -------------------------------------------------------------------
def _weights(module):
    return {n: (p.data_ptr(), p.stride(), p.dtype) for n, p in module.named_parameters()}


def test_weights_are_the_very_same_tensors_after_the_job_even_when_it_raises():
    vae = tiny_backend()
    before = _weights(vae.module)
    decode_latents(vae, marked_latents(2, size=8), options=EngineOptions(cpu_layout="channels-last"))
    assert _weights(vae.module) == before
    assert not any(p.is_inference() for p in vae.module.parameters())

    class BoomError(Exception):
        pass

    def job_that_raises() -> None:
        with vae.prepare_for_speed("channels-last"):
            vae.decode(torch.zeros(1, 4, 8, 8))
            assert vae.module.decoder.conv_in.weight.is_contiguous(memory_format=CL)
            raise BoomError

    with pytest.raises(BoomError):
        job_that_raises()
    assert _weights(vae.module) == before
    vae.module.load_state_dict(tiny_backend(seed=1).module.state_dict())  # in-place copies work


def test_weight_copies_are_reused_between_jobs_and_remade_when_the_weights_change():
    vae = tiny_backend()
    seen: list[int] = []
    vae.module.decoder.conv_in.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
    opts = EngineOptions(cpu_layout="channels-last")
    latents = marked_latents(1, size=8)
    decode_latents(vae, latents, options=opts)
    decode_latents(vae, latents, options=opts)
    assert seen[0] == seen[1] != vae.module.decoder.conv_in.weight.data_ptr()
    # An in-place change through .data bumps no version counter; the sampled values catch it.
    vae.module.decoder.conv_in.weight.data.mul_(0.5)
    changed = decode_latents(vae, latents, options=opts)
    with torch.no_grad():
        ref = vae.module.decode(to_raw(latents, vae.scaling_factor, vae.shift_factor)).sample[0]
    assert (changed.outputs[0] - ref).abs().max().item() <= 1e-5


def test_a_precision_change_during_the_job_is_kept_in_the_original_format():
    vae = tiny_backend()
    scope = LayoutScope(vae.module, vae._layout_parts(), choice="channels-last")
    try:
        scope.run("decode", torch.zeros(1, 4, 8, 8), vae._decode)
        vae.set_dtype(torch.float64)  # as the precision ladder does mid-job
    finally:
        scope.close()
    w = vae.module.decoder.conv_in.weight
    assert w.dtype == torch.float64 and w.is_contiguous()


def test_a_module_already_in_a_job_keeps_its_weights():
    vae = tiny_backend()
    outer = LayoutScope(vae.module, vae._layout_parts(), choice="channels-last")
    inner = LayoutScope(vae.module, vae._layout_parts(), choice="channels-last")
    try:
        assert outer.enabled and not inner.enabled
        before = vae.module.decoder.conv_in.weight.data_ptr()
        inner.run("decode", torch.zeros(1, 4, 8, 8), vae._decode)
        assert vae.module.decoder.conv_in.weight.data_ptr() == before
    finally:
        inner.close()
        outer.close()


def test_per_sample_mode_keeps_the_modules_layout():
    vae, clock = _tuned(1.0, 3.0)
    decode_latents(vae, marked_latents(3, size=8), options=EngineOptions(chunk_mode="per-sample"))
    assert clock.seen == [False] * 3


def test_auto_encodes_are_not_probed():
    vae = tiny_backend()
    now = [0.0]
    vae.tuner = LayoutTuner(clock=lambda: now[0])
    seen: list[bool] = []
    vae.module.encoder.conv_in.register_forward_pre_hook(
        lambda m, a: seen.append(m.weight.is_contiguous(memory_format=CL))
    )
    encode_pixels(vae, torch.zeros(3, 3, 64, 64))
    encode_pixels(vae, torch.zeros(1, 3, 64, 64))
    assert seen == [False, False]  # a chunk of 3, then one of 1: neither channels-last


def test_the_environment_can_fix_the_layout(monkeypatch):
    from lib_vaebatch.layout import default_candidates

    monkeypatch.setenv("VAEBATCH_CPU_LAYOUT", "channels-last")
    assert default_candidates() == (CHANNELS_LAST,)
    monkeypatch.setenv("VAEBATCH_CPU_LAYOUT", "")
    assert default_candidates() == (CONTIGUOUS, CHANNELS_LAST)


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="cpu_layout"):
        EngineOptions(cpu_layout="nhwc")  # type: ignore[arg-type]
