"""Bucket assignment: sd-scripts' documented rules as properties, a few hand-worked cases, and the
settings that cannot work. (tests/cache/test_sdscripts_live.py compares with sd-scripts itself.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_vaebatch.cache.buckets import BucketError, BucketSpec, crop_ltrb

SPECS = [BucketSpec(), BucketSpec(1024, 64, 256, 2048), BucketSpec(64, 32, 32, 128)]


def test_predefined_buckets_of_the_defaults():
    spec = BucketSpec()  # 512², step 64, 256..1024
    assert spec.predefined[:4] == [(256, 832), (256, 896), (256, 960), (256, 1024)]
    assert (512, 512) in spec.predefined and (1024, 256) in spec.predefined
    assert all(w * h <= 512 * 512 and w % 64 == 0 == h % 64 for w, h in spec.predefined)


def test_hand_worked_cases():
    spec = BucketSpec()
    assert spec.select(512, 512) == ((512, 512), (512, 512))
    assert spec.select(1000, 500) == ((704, 320), (704, 352))  # ratio 2.0: the closest is 2.2
    # ratio 1/3: 256x832 (0.308) is closest; the height fits, the width (277) is cropped to 256
    assert spec.select(300, 900) == ((256, 832), (277, 832))
    up = BucketSpec(no_upscale=True)
    assert up.select(300, 200) == ((256, 192), (300, 200))  # smaller than the area: never enlarged
    # shrunk to the area (724x362), then the rounding (704x320 or 640x320) that keeps 2:1 best
    assert up.select(2000, 1000) == ((640, 320), (640, 320))
    assert crop_ltrb((704, 320), (1000, 500)) == (32.0, 0, 672.0, 320)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(SPECS),
    st.booleans(),
    st.integers(16, 6000),
    st.integers(16, 6000),
)
def test_every_image_gets_a_bucket_it_covers(spec, no_upscale, w, h):
    spec = BucketSpec(spec.resolution, spec.steps, spec.min_reso, spec.max_reso, no_upscale)
    try:
        (bw, bh), (rw, rh) = spec.select(w, h)
    except BucketError as exc:
        assert no_upscale and "step" in str(exc)  # noqa: PT017 - which images may fail is the property
        return
    assert bw % spec.steps == 0 and bh % spec.steps == 0 and bw > 0 and bh > 0
    assert rw >= bw and rh >= bh  # resized to cover the bucket, then centre-cropped
    if no_upscale:
        assert rw <= max(w, spec.steps) + 1 and rh <= max(h, spec.steps) + 1
        assert bw * bh <= spec.max_area + spec.steps * max(bw, bh)
    else:
        assert (bw, bh) in spec.predefined
        assert abs(rw / rh - w / h) < 0.05 * (w / h) + 2 / min(rw, rh)
    left, top, right, bottom = crop_ltrb((bw, bh), (w, h))
    assert 0 <= left <= right <= bw + 1e-6 and 0 <= top <= bottom <= bh + 1e-6


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"steps": 20}, "multiple of 8"),
        ({"resolution": 32, "steps": 64}, "smaller than one step"),
        ({"resolution": 2048, "max_reso": 1024}, "--max-bucket-reso"),
        ({"min_reso": 2048, "max_reso": 1024, "resolution": 512}, "--min-bucket-reso"),
    ],
)
def test_settings_that_cannot_work_say_why(kwargs, word):
    with pytest.raises(BucketError, match=word):
        BucketSpec(**kwargs)
