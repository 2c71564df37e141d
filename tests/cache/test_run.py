"""``cache`` in-process: the index and shards of a real run over real files, bad inputs, resume
after SIGKILL, reruns that skip, settings that refuse to mix, the reader, and decode of a shard."""

from __future__ import annotations

import json
import shutil
import sys

import torch

from lib_vaebatch import cli
from lib_vaebatch.cache import open_cache
from lib_vaebatch.latents import read_latents
from tests.cache.conftest import (
    assert_same_cache,
    cache_args,
    index_lines,
    records_done,
    run_cache_cli,
    shard_files,
    sigkill,
    spawn_cache,
    wait_for,
)
from tests.cache.dataset import BAD, make_dataset


def said(caplog, capsys) -> str:
    """What the CLI logged and printed since the last call."""
    text = caplog.text + capsys.readouterr().err
    caplog.clear()
    return text


def test_the_index_has_every_image_with_its_bucket_shard_and_the_bad_files_failed(reference, dataset):
    lines = index_lines(reference)
    # every file under SRC is a source image: nothing was written there
    images = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert sorted(r["source"] for r in lines) == images and len(lines) == 100
    failed = {r["source"]: r["error"] for r in lines if r["status"] == "failed"}
    assert set(failed) == set(BAD)
    for name, word in BAD.items():
        assert word in failed[name], (name, failed[name])
    ok = [r for r in lines if r["status"] == "ok"]
    assert len(ok) == 95
    seen = set()
    for r in ok:
        w, h = r["bucket"]
        assert r["shard"] == f"{w}x{h}/part-{int(r['shard'].split('-')[1][:5]):05d}.safetensors"
        assert (r["shard"], r["row"]) not in seen
        seen.add((r["shard"], r["row"]))
        assert w % 32 == 0 and h % 32 == 0 and w * h <= 64 * 64 + 32 * 64
        assert len(r["original_size"]) == 2 and len(r["crop_ltrb"]) == 4
    # EXIF orientation 6 swaps the stored width and height (dataset.py writes them rotated)
    rotated = next(r for r in ok if r["source"].endswith("img001.jpg"))
    from PIL import Image

    with Image.open(dataset / rotated["source"]) as img:
        assert tuple(rotated["original_size"]) == (img.size[1], img.size[0])
    # every shard holds its rows, in order, with our usual metadata plus sources, sizes, crops
    for rel in shard_files(reference):
        batch = read_latents(reference / rel)
        rows = sorted((r for r in ok if r["shard"] == rel), key=lambda r: r["row"])
        assert batch.sources == [r["source"] for r in rows]
        assert batch.sizes == [tuple(r["original_size"]) for r in rows]
        assert json.loads(batch.extra["crops"]) == [r["crop_ltrb"] for r in rows]
        assert batch.family == "sd1" and batch.scaled and batch.vae_name == "tiny-vae.safetensors"
        assert batch.latents.shape[1:] == (4, rows[0]["bucket"][1] // 8, rows[0]["bucket"][0] // 8)
        assert torch.isfinite(batch.latents).all()
    assert not list(reference.rglob("*.tmp"))


def test_a_failed_run_names_the_count(dataset, vae_file, tmp_path, caplog, capsys):
    sub = tmp_path / "src"
    shutil.copytree(dataset / "bad", sub / "bad")
    shutil.copy(dataset / "set0" / "img003.png", sub)
    assert run_cache_cli(*cache_args(sub, tmp_path / "out", vae_file)) == cli.EXIT_FAILED
    err = said(caplog, capsys)
    assert "5 image(s) failed" in err and "bad/huge.png" in err and "1 ok" in err


def test_killed_mid_run_then_rerun_equals_an_uninterrupted_run(reference, dataset, vae_file, tmp_path):
    out = tmp_path / "out"
    proc = spawn_cache(*cache_args(dataset, out, vae_file))
    wait_for(lambda: records_done(out) >= 2, proc)
    sigkill(proc)
    done_before = records_done(out)
    assert 2 <= done_before < len(shard_files(reference)), "the kill came after the run had finished"
    finished = [
        out / (json.loads(p.read_text())["shard"] + ".safetensors")
        for p in (out / ".vaebatch" / "records").rglob("*.json")
    ]
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}
    assert run_cache_cli(*cache_args(dataset, out, vae_file)) == cli.EXIT_FAILED
    assert_same_cache(reference, out)
    # the shards finished before the kill were checked, not written again
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == kept


def test_a_rerun_encodes_nothing_and_other_settings_are_refused(
    vae_file, other_vae_file, tmp_path, caplog, capsys
):
    src = tmp_path / "src"
    make_dataset(src, 12, seed=3, bad=False)
    out = tmp_path / "out"
    assert run_cache_cli(*cache_args(src, out, vae_file)) == 0
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("part-*.safetensors")}
    capsys.readouterr()
    assert run_cache_cli(*cache_args(src, out, vae_file)) == 0
    assert "0 processed in 0 shard(s), 12 already done" in said(caplog, capsys)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("part-*.safetensors")} == files
    # a damaged shard (same name, wrong content) is found by its header and encoded again
    victim = min(files)
    victim.write_bytes(victim.read_bytes()[:100])
    assert run_cache_cli(*cache_args(src, out, vae_file)) == 0
    assert "1 shard(s)" in said(caplog, capsys) and read_latents(victim).latents.shape[0] > 0
    # a changed image (same size) re-encodes its shard; a new one fills a new shard
    make_dataset(src / "more", 2, seed=9, bad=False)
    assert run_cache_cli(*cache_args(src, out, vae_file)) == 0
    assert "2 processed" in said(caplog, capsys) and len(index_lines(out)) == 14
    for args, word in [
        (("--vae", str(other_vae_file)), "other-vae.safetensors"),
        (("--resolution", "96"), "resolution"),
        (("--flip",), "flip"),
        (("--sample",), "value"),
    ]:
        argv = cache_args(src, out, vae_file)
        if args[0] in argv:
            argv[argv.index(args[0]) + 1] = args[1]
        else:
            argv += list(args)
        assert run_cache_cli(*argv) == cli.EXIT_INPUT
        err = said(caplog, capsys)
        assert "other settings" in err and word in err and "--overwrite" in err
    argv = [*cache_args(src, out, other_vae_file), "--overwrite"]
    assert run_cache_cli(*argv) == 0
    assert read_latents(victim).vae_name == "other-vae.safetensors"


def test_sampling_is_seeded_per_image_whatever_the_set(vae_file, tmp_path):
    src = tmp_path / "src"
    make_dataset(src, 10, seed=5, bad=False)
    assert run_cache_cli(*cache_args(src, tmp_path / "a", vae_file, "--sample", "--seed", "7")) == 0
    some = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.*"))[::3]
    listing = src / "some.txt"  # seeds come from paths relative to the SRC: here the same as in a
    listing.write_text("# a list of images, relative to this file\n" + "\n".join(some))
    assert run_cache_cli(*cache_args(listing, tmp_path / "b", vae_file, "--sample", "--seed", "7")) == 0
    assert run_cache_cli(*cache_args(src, tmp_path / "c", vae_file, "--seed", "7")) == 0
    a, b, mean = (open_cache(tmp_path / d) for d in "abc")
    by_source = {a[i]["source"]: a[i]["latents"] for i in range(len(a))}
    assert len(b) == len(some)
    for i in range(len(b)):
        assert b[i]["latents"].equal(by_source[b[i]["source"]])
    assert not a[0]["latents"].equal(mean[0]["latents"])  # sampled, not the mean


def test_open_cache_is_a_dataset_and_iterates_by_bucket(reference):
    cache = open_cache(reference)
    assert len(cache) == 95
    item = cache[3]
    assert item["latents"].shape == (4, item["bucket"][1] // 8, item["bucket"][0] // 8)
    seen = 0
    for batch in cache.iter_buckets(batch_size=4):
        w, h = batch["bucket"]
        assert batch["latents"].shape[1:] == (4, h // 8, w // 8) and len(batch["source"]) <= 4
        seen += batch["latents"].shape[0]
    assert seen == 95
    loader = torch.utils.data.DataLoader(cache, batch_size=None, shuffle=False)
    assert next(iter(loader))["latents"].equal(cache[0]["latents"])
    cache.close()


def test_a_shard_is_a_valid_input_of_decode(reference, vae_file, tmp_path):
    shard = reference / shard_files(reference)[0]
    n = read_latents(shard).latents.shape[0]
    args = ["decode", str(shard), "-o", str(tmp_path / "png"), "--vae", str(vae_file), "--no-progress"]
    assert cli.main(args) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == n


def test_flip_and_alpha_mask_are_stored_beside_the_latents(vae_file, tmp_path):
    src = tmp_path / "src"
    make_dataset(src, 6, seed=2, bad=False)
    out = tmp_path / "out"
    assert run_cache_cli(*cache_args(src, out, vae_file, "--flip", "--alpha", "mask", "--bf16")) == 0
    cache = open_cache(out)
    for i in range(len(cache)):
        item = cache[i]
        w, h = item["bucket"]
        assert item["latents_flipped"].shape == item["latents"].shape
        assert not item["latents_flipped"].equal(item["latents"])
        assert item["alpha_mask"].shape == (h, w) and 0 <= item["alpha_mask"].min() <= 1
    rgba = next(i for i in range(len(cache)) if cache[i]["source"].endswith("img000.png"))
    mask = cache[rgba]["alpha_mask"]  # dataset.py: alpha ramps from 0 to 255, left to right
    assert mask.min() < 0.4 < 0.6 < mask.max() and (mask[:, 1:] >= mask[:, :-1]).all()
    from safetensors import safe_open

    with safe_open(str(out / shard_files(out)[0]), "pt") as f:
        assert f.get_slice("latents").get_dtype() == "BF16"


def test_ray_missing_is_a_one_line_error(dataset, vae_file, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert run_cache_cli(*cache_args(dataset / "set1", tmp_path / "out", vae_file, "--ray")) == cli.EXIT_INPUT
    assert "pip install 'sd-webui-vae-batch[ray]'" in said(caplog, capsys)


def test_bad_arguments_are_one_line_errors(dataset, vae_file, tmp_path, caplog, capsys):
    for extra, word in [
        (["--bucket-reso-steps", "20"], "multiple of 8"),
        (["--format", "kohya", "--half"], "float32"),
    ]:
        assert run_cache_cli(*cache_args(dataset, tmp_path / "o", vae_file, *extra)) == cli.EXIT_INPUT
        assert word in said(caplog, capsys)
    assert run_cache_cli(*cache_args(tmp_path / "missing", tmp_path / "o", vae_file)) == cli.EXIT_INPUT
    assert "no such file or folder" in said(caplog, capsys)
    bad_list = tmp_path / "list.json"
    bad_list.write_text('{"not": "a list"}')
    assert run_cache_cli(*cache_args(bad_list, tmp_path / "o", vae_file)) == cli.EXIT_INPUT
    assert "list of path strings" in said(caplog, capsys)
