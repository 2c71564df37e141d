"""A decode or encode job in a process whose address space is really limited (RLIMIT_AS), for
test_memory_limit.py. Builds the seeded VAE, warms up (threads, kernels, the allocator), measures
the tensor memory one untiled run of a sample allocates here, then caps the address space at its
current size plus ``FRACTION`` of that and runs the engine on the batch, so every allocation beyond
it fails for real. Before the job it shows what the cap rules out: the leanest spilling schedule
run with its spilled values kept in memory (a host store: what the job would hold if spilling
did not take values out of the process) must fail under the cap. Writes the outputs
(safetensors) and a JSON report.

python -m tests.tiling.limit_child OP FRACTION BUDGET OUT_DIR [SPILL]
    OP: decode | encode;  BUDGET: "free" (the engine asks the OS) or bytes to plan with (a budget
    the limit does not honour, so the engine meets real allocation failures); SPILL: "spill"
    (default: whole values that do not fit go to a temporary file) or "nospill" (recompute)
"""

from __future__ import annotations

import gc
import json
import resource
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.encode import encode_pixels
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.tiling import SpillStore, TileSettings, run_tiled
from tests.support import tensor_peak
from tests.tiling.limits import SIZE, N, inputs, limit_backend


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def main() -> int:
    op, fraction, budget, out_dir = sys.argv[1:5]
    spill = (sys.argv[5] if len(sys.argv) > 5 else "spill") == "spill"
    out = Path(out_dir)
    torch.set_num_threads(2)
    backend = limit_backend()
    x = inputs(op)
    options = EngineOptions(
        max_chunk=N, memory_budget=None if budget == "free" else int(budget), output_dtype="fp32",
        spill=spill,
    )  # fmt: skip
    run = decode_latents if op == "decode" else encode_pixels
    # warm-up at a small size: untiled and tiled, so threads and kernels exist before the cap
    small = x[:1, :, : x.shape[2] // 4, : x.shape[3] // 4]
    run(backend, small, options=EngineOptions())
    run(backend, small, options=EngineOptions(tiling="always", tile_size=8))
    with torch.no_grad(), tensor_peak() as untiled:
        one = backend.decode(x[:1]) if op == "decode" else backend.encode(x[:1])
    need = untiled.peak
    del one
    program = backend.tiling_program(op)
    first = x[:1] / backend.scaling_factor if op == "decode" else x[:1]
    in_memory = TileSettings(leanest=True, budget=0, spill=SpillStore("host", 1 << 40))
    gc.collect()
    base = _vm("VmSize:")
    headroom = int(float(fraction) * need) // 2**20
    cap = base + headroom * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    # the limit is real and below what spilling saves: the same leanest schedule with its spilled
    # values held in memory does not fit under it
    try:
        with torch.no_grad():
            run_tiled(program, first, in_memory)
        really_limited = False
    except (RuntimeError, MemoryError):
        really_limited = True
    gc.collect()
    result = run(backend, x, options=options)
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    tensors = {f"s{i}": t.contiguous() for i, t in enumerate(result.outputs) if t is not None}
    if tensors:
        save_file(tensors, str(out / "outputs.safetensors"))
    report = {
        "really_limited": really_limited,
        "in_memory_mode": in_memory.used_mode,
        "size": SIZE,
        "headroom_mib": headroom,
        "untiled_tensors_mib": need / 2**20,
        "reports": [r.to_dict() for r in result.reports],
        "events": result.events,
        "summary": result.summary(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
