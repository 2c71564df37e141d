"""Live check against kohya-ss/sd-scripts' own code, from a checkout beside the project (never part
of it): its BucketManager assigns the same buckets, and its latents caching strategy finds our
npz files where it looks, judges them valid (so ``--cache_latents_to_disk`` skips caching them) and
loads them with the expected shapes.

Skipped unless ``VAEBATCH_SDSCRIPTS`` names the checkout; ``VAEBATCH_SDSCRIPTS_PATH`` adds import
paths for its dependencies (accelerate, transformers, diffusers, cv2, imagesize, toml, torchvision),
which the child process that imports sd-scripts gets before ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cache.conftest import BUCKETS, cache_args, index_lines, run_cache_cli
from tests.cache.dataset import make_dataset

SDSCRIPTS = os.environ.get("VAEBATCH_SDSCRIPTS")
pytestmark = pytest.mark.skipif(
    not SDSCRIPTS, reason="set VAEBATCH_SDSCRIPTS to a kohya-ss/sd-scripts checkout to run the live check"
)

CHECK = r"""
import json, sys
import imagesize, numpy as np
from library import strategy_sd, train_util

job = json.load(open(sys.argv[1]))
s = job["buckets"]
bm = train_util.BucketManager(s["no_upscale"], (s["resolution"], s["resolution"]), s["min_reso"],
                              s["max_reso"], s["steps"])
if not s["no_upscale"]:
    bm.make_buckets()
strategy = strategy_sd.SdSdxlLatentsCachingStrategy(True, True, 1, False)
problems, checked = [], 0
for rec in job["records"]:
    path = job["root"] + "/" + rec["source"]
    w, h = imagesize.get(path)  # what sd-scripts' dataset reads the size with
    bucket, resized, _err = bm.select_bucket(w, h)
    if list(bucket) != rec["bucket"]:
        problems.append(f"{rec['source']}: sd-scripts bucket {bucket}, ours {rec['bucket']}")
        continue
    if list(train_util.BucketManager.get_crop_ltrb(bucket, (w, h))) != rec["crop_ltrb"]:
        problems.append(f"{rec['source']}: crop_ltrb differs")
    npz = strategy.get_latents_npz_path(path, (w, h))
    if npz != rec["npz"]:
        problems.append(f"{rec['source']}: sd-scripts looks for {npz}, ours is {rec['npz']}")
        continue
    if not strategy.is_disk_cached_latents_expected(bucket, npz, job["flip"], job["mask"]):
        problems.append(f"{npz}: sd-scripts judges it not valid")
    lat, osize, crop, flipped, mask = strategy.load_latents_from_disk(npz, bucket)
    want = (4, bucket[1] // 8, bucket[0] // 8)
    if lat.shape != want or lat.dtype != np.float32 or list(osize) != [w, h]:
        problems.append(f"{npz}: loaded {lat.shape} {lat.dtype} {osize}")
    if job["flip"] and (flipped is None or flipped.shape != want):
        problems.append(f"{npz}: no flipped latents")
    if job["mask"] and (mask is None or mask.shape != (bucket[1], bucket[0])):
        problems.append(f"{npz}: no alpha mask")
    checked += 1
print(json.dumps({"checked": checked, "problems": problems}))
"""


def _spec(extra: list[str]) -> dict[str, object]:
    args = BUCKETS + extra
    get = lambda flag: int(args[len(args) - 1 - args[::-1].index(flag) + 1])  # noqa: E731 (the last one)
    return {
        "resolution": get("--resolution"), "steps": get("--bucket-reso-steps"),
        "min_reso": get("--min-bucket-reso"), "max_reso": get("--max-bucket-reso"),
        "no_upscale": "--no-upscale" in extra,
    }  # fmt: skip


# (at 64² a 145x69 image has no no-upscale bucket: sd-scripts divides by zero there, we fail it)
@pytest.mark.parametrize("extra", [["--flip", "--alpha", "mask"], ["--no-upscale", "--resolution", "128"]])
def test_sd_scripts_finds_loads_and_accepts_our_npz(tmp_path, vae_file, extra):
    src = tmp_path / "src"
    make_dataset(src, 24, seed=8, bad=False)
    out = tmp_path / "out"
    assert run_cache_cli(*cache_args(src, out, vae_file, "--format", "kohya", *extra)) == 0
    job = tmp_path / "job.json"
    records = index_lines(out)
    job.write_text(
        json.dumps({
            "root": str(src), "records": records, "buckets": _spec(extra), "flip": "--flip" in extra,
            "mask": "mask" in extra,
        })
    )  # fmt: skip
    paths = [SDSCRIPTS, *filter(None, os.environ.get("VAEBATCH_SDSCRIPTS_PATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(job)],
        cwd=str(Path(SDSCRIPTS)),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["problems"] == [] and result["checked"] == len(records) == 24
