"""``--format kohya``: the npz files sd-scripts reads (names, keys, shapes, dtypes), written next to
each image and nowhere else, read back without pickle; reruns skip; others' npz are never touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_vaebatch import cli
from lib_vaebatch.cache import kohya, open_cache
from lib_vaebatch.families import get_family, to_raw
from tests.cache.conftest import cache_args, index_lines, run_cache_cli
from tests.cache.dataset import make_dataset


@pytest.fixture(scope="module")
def kohya_run(tmp_path_factory, vae_file):
    src = tmp_path_factory.mktemp("kohya") / "src"
    images = make_dataset(src, 8, seed=4, bad=False)
    out = src.parent / "out"
    assert (
        run_cache_cli(*cache_args(src, out, vae_file, "--format", "kohya", "--flip", "--alpha", "mask")) == 0
    )
    return src, images, out


def test_one_npz_per_image_named_keyed_and_shaped_as_sd_scripts_reads_it(kohya_run):
    src, images, out = kohya_run
    written = sorted(p for p in src.rglob("*") if p.is_file() and p not in images)
    assert all(p.suffix == ".npz" for p in written) and len(written) == len(images)
    records = {r["source"]: r for r in index_lines(out)}
    for image in images:
        with Image.open(image) as img:
            w, h = img.size  # the stored size, as sd-scripts' imagesize reads it (no EXIF rotation)
        npz = image.with_name(f"{image.stem}_{w:04d}x{h:04d}_sd.npz")
        rec = records[image.relative_to(src).as_posix()]
        assert rec["status"] == "ok" and rec["npz"] == str(npz) and "shard" not in rec
        bw, bh = rec["bucket"]
        with np.load(npz, allow_pickle=False) as f:
            assert set(f.files) == {
                "latents", "original_size", "crop_ltrb", "latents_flipped", "alpha_mask", kohya.MARKER
            }  # fmt: skip
            assert f["latents"].shape == (4, bh // 8, bw // 8) and f["latents"].dtype == np.float32
            assert f["latents_flipped"].shape == f["latents"].shape
            assert f["latents_flipped"].dtype == np.float32
            assert f["original_size"].tolist() == [w, h] and f["original_size"].dtype.kind == "i"
            assert f["crop_ltrb"].shape == (4,) and f["crop_ltrb"].tolist() == rec["crop_ltrb"]
            assert f["alpha_mask"].shape == (bh, bw) and f["alpha_mask"].dtype == np.float32
    assert not list(out.rglob("*.safetensors")) and not list(out.rglob("*.npz"))


def _sd_scripts_npz_for(image: Path, size: tuple[int, int], sdxl: bool = False) -> Path:
    """Where sd-scripts looks (library/strategy_sd.py, SdSdxlLatentsCachingStrategy
    .get_latents_npz_path): ``<stem>.npz`` if that file exists, else ``<stem>_WWWWxHHHH_sd.npz``
    (``_sdxl.npz``), the size being the image file's own."""
    old = image.with_suffix(".npz")
    if old.exists():
        return old
    return image.with_name(f"{image.stem}_{size[0]:04d}x{size[1]:04d}{'_sdxl' if sdxl else '_sd'}.npz")


def _sd_scripts_reads(npz: Path, flip: bool, mask: bool) -> dict:
    """What sd-scripts' SD/SDXL cache check and loader take from an npz (strategy_base.py,
    LatentsCachingStrategy._default_is_disk_cached_latents_expected and
    _default_load_latents_from_disk, no resolution suffix for SD/SDXL): ``np.load`` with its
    default (no pickle), "cached" only if ``latents`` (and ``latents_flipped`` with flip,
    ``alpha_mask`` with a mask) are present; ``original_size`` and ``crop_ltrb`` through
    ``tolist()``; the flipped latents and mask where present."""
    with np.load(npz) as f:  # numpy's default allow_pickle=False, as sd-scripts calls it
        cached = "latents" in f and (not flip or "latents_flipped" in f) and (not mask or "alpha_mask" in f)
        return {
            "cached": cached,
            "latents": f["latents"],
            "original_size": f["original_size"].tolist(),
            "crop_ltrb": f["crop_ltrb"].tolist(),
            "flipped": f.get("latents_flipped"),
            "mask": f.get("alpha_mask"),
        }


def test_sd_scripts_loader_as_written_down_finds_judges_and_loads_our_npz(kohya_run):
    """The CI-side twin of tests/cache/test_sdscripts_live.py: sd-scripts' lookup, validity check
    and loader, restated from its source (above), over every npz we wrote."""
    src, images, out = kohya_run
    records = {r["source"]: r for r in index_lines(out)}
    for image in images:
        rec = records[image.relative_to(src).as_posix()]
        with Image.open(image) as img:
            size = img.size
        npz = _sd_scripts_npz_for(image, size)
        assert str(npz) == rec["npz"], "sd-scripts looks where we wrote"
        got = _sd_scripts_reads(npz, flip=True, mask=True)
        bw, bh = rec["bucket"]
        assert got["cached"], f"{npz}: sd-scripts would encode it again"
        assert got["latents"].shape == (4, bh // 8, bw // 8) and got["latents"].dtype == np.float32
        assert got["original_size"] == list(size) and all(type(v) is int for v in got["original_size"])
        assert got["crop_ltrb"] == rec["crop_ltrb"]
        assert got["flipped"].shape == got["latents"].shape and got["mask"].shape == (bh, bw)
    # an old-style file next to an image wins the lookup: why the cache refuses to run past one
    old = images[0].with_suffix(".npz")
    np.savez(old, latents=np.zeros((4, 1, 1), np.float32))
    try:
        with Image.open(images[0]) as img:
            assert _sd_scripts_npz_for(images[0], img.size) == old
    finally:
        old.unlink()


def test_kohya_latents_are_the_vaes_raw_latents(kohya_run, vae_file, tmp_path):
    """sd-scripts multiplies by the scaling factor itself: the npz holds raw latents, ours scaled."""
    src, images, _out = kohya_run
    plain = [p for p in images if p.suffix == ".png"]  # no EXIF rotation, so the same pixels
    listing = src / "plain.txt"
    listing.write_text("\n".join(p.relative_to(src).as_posix() for p in plain))
    try:
        assert (
            run_cache_cli(*cache_args(listing, tmp_path / "ours", vae_file, "--flip", "--alpha", "mask")) == 0
        )
    finally:
        listing.unlink()
    ours = open_cache(tmp_path / "ours")
    sd1 = get_family("sd1")
    for i in range(len(ours)):
        item = ours[i]
        image = src / item["source"]
        w, h = item["original_size"]
        arrays = kohya.read(image.with_name(f"{image.stem}_{w:04d}x{h:04d}_sd.npz"))
        raw = to_raw(item["latents"], sd1.scaling_factor, sd1.shift_factor)
        assert np.array_equal(arrays["latents"], raw.numpy())
        assert np.array_equal(arrays["alpha_mask"], item["alpha_mask"].numpy())


def test_a_rerun_skips_and_foreign_npz_are_refused(kohya_run, vae_file, caplog):
    src, _images, out = kohya_run
    args = cache_args(src, out, vae_file, "--format", "kohya", "--flip", "--alpha", "mask")
    stamps = {p: p.stat().st_mtime_ns for p in src.rglob("*.npz")}
    caplog.clear()
    assert run_cache_cli(*args) == 0
    assert "0 processed" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in src.rglob("*.npz")} == stamps
    # someone else's npz in the place of ours, alone (the old-style name: the next test)
    victim = next(iter(stamps))
    victim.unlink()
    np.savez(victim, latents=np.zeros((4, 1, 1), np.float32))
    assert run_cache_cli(*args) == cli.EXIT_INPUT
    assert kohya.marker(victim) is None  # not overwritten
    victim.unlink()
    assert run_cache_cli(*args) == 0 and kohya.marker(victim) is not None


def test_an_old_style_npz_alone_is_refused_before_anything_is_written(tmp_path, vae_file, capsys):
    """sd-scripts reads ``<stem>.npz`` instead of ``<stem>_WxH_sd.npz`` where it exists: with
    only that in the way (no same-name npz), a new cache refuses to start and names it."""
    src = tmp_path / "src"
    images = make_dataset(src, 4, seed=6, bad=False)
    old = kohya.old_npz_path(images[2])
    np.savez(old, latents=np.zeros((4, 1, 1), np.float32))
    before = sorted(src.rglob("*"))
    args = cache_args(src, tmp_path / "out", vae_file, "--format", "kohya")
    capsys.readouterr()
    assert run_cache_cli(*args) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert f"{old} (sd-scripts would read it instead)" in err
    assert "1 npz file(s)" in err, "the old-style npz is the only thing in the way"
    assert sorted(src.rglob("*")) == before, "nothing written next to the images"
    assert kohya.read(old)["latents"].shape == (4, 1, 1), "and the old file left as it was"
    old.unlink()
    assert run_cache_cli(*args) == 0
    assert len(list(src.rglob("*_sd.npz"))) == len(images)


def test_npz_names_follow_the_family():
    image = Path("/data/a.b/cat.png")
    assert kohya.npz_path(image, (640, 480), "sdxl") == Path("/data/a.b/cat_0640x0480_sdxl.npz")
    assert kohya.npz_path(image, (64, 1024), "sd2") == Path("/data/a.b/cat_0064x1024_sd.npz")
    with pytest.raises(ValueError, match="flux"):
        kohya.npz_path(image, (64, 64), "flux")
