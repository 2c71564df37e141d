"""ComfyUI's own ``VAEDecode`` against the pack's ``VAEBatchDecode``, in one ComfyUI process, on the
same latents and the same ``VAE`` object: time and peak memory, fp32 and bf16.

Run with the Python of a ComfyUI installation (its torch, its packages) and point it at that
ComfyUI's folder; the VAE file is one of its ``models/vae`` (full SD size; random weights do):

    /path/to/ComfyUI/venv/bin/python bench/bench_comfy.py --comfyui /path/to/ComfyUI \\
        --vae lab-sd1-random-fp32.safetensors --cases 512x4 1024x1 --dtypes fp32 bf16 --repeats 2

ComfyUI is imported in-process on the CPU (``--cpu``), the nodes are called as ComfyUI's executor
calls them (``VAEDecode().decode``, the pack's node class ``execute``) under
``torch.inference_mode``. Each case runs both methods once untimed (first-call costs), then
``--repeats`` rounds with the order alternating; the median is reported, with the peak resident
set's rise over each call (``/proc/self/clear_refs``) and the largest pixel difference (levels of
8 bits) between the two outputs. Writes bench/results/<name>.json and .md. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, machine, median, rss_peak_since, rss_peak_start, timed, write


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", required=True, help="the ComfyUI folder (its main.py)")
    ap.add_argument("--vae", default="lab-sd1-random-fp32.safetensors", help="a file in its models/vae")
    ap.add_argument("--cases", nargs="+", default=["512x4", "1024x1"], help="SIDExBATCH image sizes")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="comfy-cpu")
    args = ap.parse_args()

    comfy_dir = Path(args.comfyui).resolve()
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.sd
    import comfy.utils
    import nodes
    import torch

    from lib_vaebatch.comfy.nodes import node_classes

    ours_cls = next(c for c in node_classes() if c.__name__ == "VAEBatchDecode")
    from comfy_api.latest._io import HiddenHolder  # ComfyUI sets ``hidden`` on the class it runs

    ours_cls.hidden = HiddenHolder.from_dict({"UNIQUE_ID": "bench"})
    sd = comfy.utils.load_torch_file(str(comfy_dir / "models" / "vae" / args.vae))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    info = machine()
    rows, results = [], []
    for dt in args.dtypes:
        vae = comfy.sd.VAE(sd=sd, dtype=dtypes[dt])
        for case in args.cases:
            side, batch = (int(v) for v in case.lower().split("x"))
            z = torch.randn(
                batch, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(side + batch)
            )

            def theirs(z: torch.Tensor = z, vae: object = vae) -> torch.Tensor:
                with torch.inference_mode():
                    return nodes.VAEDecode().decode(vae, {"samples": z})[0]

            def ours(z: torch.Tensor = z, vae: object = vae) -> torch.Tensor:
                with torch.inference_mode():
                    return ours_cls.execute({"samples": z}, vae).args[0]

            out = {"comfyui": theirs(), "vaebatch": ours()}  # untimed: first-call costs
            diff = float((out["comfyui"] - out["vaebatch"]).abs().max()) * 255
            del out
            secs: dict[str, list[float]] = {"comfyui": [], "vaebatch": []}
            peaks: dict[str, list[int]] = {"comfyui": [], "vaebatch": []}
            for r in range(args.repeats):
                order = [("comfyui", theirs), ("vaebatch", ours)]
                for name, fn in order if r % 2 == 0 else order[::-1]:
                    start = rss_peak_start()
                    secs[name].append(timed(fn, torch.device("cpu")))
                    peak = rss_peak_since(start)
                    peaks[name].append(peak or 0)
                    print(
                        f"{dt} {case} {name}: {secs[name][-1]:.1f} s, peak +{(peak or 0) / 2**20:.0f} MiB",
                        flush=True,
                    )
            res = {
                "dtype": dt, "case": case, "seconds": secs, "peak_rss_rise_bytes": peaks,
                "median_seconds": {k: median(v) for k, v in secs.items()},
                "max_diff_levels": diff,
            }  # fmt: skip
            res["speed_ratio"] = res["median_seconds"]["comfyui"] / res["median_seconds"]["vaebatch"]
            results.append(res)
            m = res["median_seconds"]
            pc, pv = max(peaks["comfyui"]) / 2**20, max(peaks["vaebatch"]) / 2**20
            rows.append(
                f"| {dt} | {side}² | {batch} | {m['comfyui']:.1f} | {m['vaebatch']:.1f} "
                f"| {res['speed_ratio']:.3f}× | {pc:.0f} / {pv:.0f} | {diff:.2f} |"
            )
        del vae
    info["load_average_after"] = load_average()
    head = (
        "| dtype | size | batch | ComfyUI VAEDecode s | VAEBatchDecode s | speed (ComfyUI / ours) "
        "| peak RSS rise MiB (ComfyUI / ours) | max diff (levels) |\n|---|---|---|---|---|---|---|---|"
    )
    payload = {"machine": info, "comfyui": str(comfy_dir), "vae": args.vae, "repeats": args.repeats,
               "results": results}  # fmt: skip
    js, md = write(args.name, payload, head + "\n" + "\n".join(rows))
    print(json.dumps({"json": str(js), "md": str(md)}))
    print(head + "\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
