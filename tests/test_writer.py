"""Background image writing: real files, real approximate-VAE decodes, injected slow and failing
saves. No timing assertions (the speed is measured by bench/bench_save_overlap.py)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch
from PIL import Image

from lib_vaebatch import infotext
from lib_vaebatch.backends import ApproxVAE
from lib_vaebatch.engine.decode import decode_latents
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.images import tensor_to_image
from lib_vaebatch.jobs import decode_to_folder
from lib_vaebatch.latents import LatentBatch
from lib_vaebatch.naming import SequentialNamer
from lib_vaebatch.saving import read_infotext
from lib_vaebatch.writer import ImageWriter, WriteJob, WriterError, folder_saver
from tests.support import marked_latents

VAE = ApproxVAE("sd1")
CHUNKS_OF_2 = EngineOptions(max_chunk=2)


def _batch(name: str, n: int, seed: int = 0) -> LatentBatch:
    return LatentBatch(
        marked_latents(n, size=8, seed=seed, scale=4.0), family="sd1", path=f"{name}.safetensors"
    )


def _decoded(batch: LatentBatch) -> list[Image.Image]:
    result = decode_latents(VAE, batch.latents)
    return [tensor_to_image(s) for s in result.outputs]


def _pixels(source: Path | Image.Image) -> np.ndarray:
    img = source if isinstance(source, Image.Image) else Image.open(source)
    return np.asarray(img.convert("RGB"))


def _image(i: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (i * 10 % 256, 0, 0))


def test_every_image_is_written_in_decode_order_with_metadata(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00003-older.png").write_bytes(b"keep me")
    batches = [_batch("a", 5), _batch("b", 3, seed=1)]
    job = decode_to_folder(
        batches, out, lambda fam: VAE, options=CHUNKS_OF_2, writers=2, max_pending=2, keep_images=True
    )
    assert job.ok and not job.save_errors
    expected = [f"{4 + k:05}-a-{k}.png" for k in range(5)] + [f"{9 + k:05}-b-{k}.png" for k in range(3)]
    assert [s.path.name for s in job.saved] == expected
    assert sorted(os.listdir(out)) == ["00003-older.png", *expected]
    assert (out / "00003-older.png").read_bytes() == b"keep me"
    for batch, entry in zip(batches, job.files, strict=True):
        assert [s.index for s in entry.saved] == list(range(len(batch)))
        for saved, want in zip(entry.saved, _decoded(batch), strict=True):
            text = read_infotext(saved.path)
            assert text == saved.infotext
            params = infotext.parse(text).params
            assert params["VAE Batch"] == "on" and params["Size"] == "64x64"
            assert np.array_equal(_pixels(saved.path), _pixels(want))
            assert saved.image is not None and np.array_equal(_pixels(saved.image), _pixels(want))


def test_names_and_bytes_do_not_depend_on_the_number_of_writers(tmp_path):
    batches = [_batch("x", 7)]
    outputs = {}
    for writers in (0, 1, 3):
        job = decode_to_folder(
            batches, tmp_path / str(writers), lambda fam: VAE, writers=writers, max_pending=2
        )
        assert job.ok
        outputs[writers] = {s.path.name: s.path.read_bytes() for s in job.saved}
    assert list(outputs[0]) == [f"{k:05}-x-{k}.png" for k in range(7)]
    assert outputs[0] == outputs[1] == outputs[3]


def test_names_follow_submit_order_when_saves_finish_out_of_order(tmp_path):
    inner = folder_saver(SequentialNamer(tmp_path))
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.01) for _ in range(24)]

    def jittered(job: WriteJob) -> Path:
        time.sleep(delays[job.seq])  # later jobs often finish encoding first
        return inner(job)

    with ImageWriter(jittered, workers=4, max_pending=6) as writer:
        for i in range(24):
            writer.submit(_image(i), f"img{i}", infotext=f"n {i}")
    results = writer.close()
    assert [r.path.name for r in results if r.path] == [f"{i:05}-img{i}.png" for i in range(24)]
    assert all(read_infotext(tmp_path / f"{i:05}-img{i}.png") == f"n {i}" for i in range(24))


def test_images_in_flight_never_exceed_the_bound():
    lock = threading.Lock()
    counts = {"submitted": 0, "finished": 0, "running": 0, "most_running": 0}

    def slow(job: WriteJob) -> None:
        with lock:
            counts["running"] += 1
            counts["most_running"] = max(counts["most_running"], counts["running"])
        job.image  # noqa: B018 - the conversion happens in the worker
        time.sleep(0.005)
        with lock:
            counts["running"] -= 1
            counts["finished"] += 1

    writer = ImageWriter(slow, workers=3, max_pending=2)  # fewer slots than threads
    for i in range(20):
        writer.submit(torch.zeros(3, 8, 8), f"{i}")
        with lock:
            counts["submitted"] += 1
            assert counts["submitted"] - counts["finished"] <= 2
        assert writer.in_flight <= 2
    results = writer.close()
    assert len(results) == 20 and all(r.ok for r in results)
    assert counts["most_running"] <= 2 and writer.peak_in_flight <= 2


def test_submit_blocks_while_the_bound_is_full():
    gate = threading.Event()
    writer = ImageWriter(lambda job: gate.wait(30) and None, workers=2, max_pending=2)
    third = threading.Event()

    def producer() -> None:
        for i in range(3):
            writer.submit(_image(i), f"{i}")
        third.set()

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        assert not third.wait(0.3)  # two images in flight, both stuck: the third submit waits
    finally:
        gate.set()
        thread.join(30)
    assert third.is_set()
    assert len(writer.close()) == 3


class _FullDisk:
    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class DiskFullAt(SequentialNamer):
    """Fails the write of one decoration the way a full disk does (after the file was named)."""

    def __init__(self, directory: Path, bad: str) -> None:
        super().__init__(directory)
        self.bad = bad

    @contextlib.contextmanager
    def create(self, decoration: str, suffix: str) -> Iterator[tuple[Path, IO[bytes]]]:
        with super().create(decoration, suffix) as (path, fh):
            yield path, (_FullDisk() if decoration == self.bad else fh)  # type: ignore[misc]


def test_a_failed_write_names_the_file_keeps_the_image_and_the_rest_are_saved(tmp_path):
    batch = _batch("lat", 4)
    save = folder_saver(DiskFullAt(tmp_path, "lat-2"))
    job = decode_to_folder([batch], tmp_path, lambda fam: VAE, options=CHUNKS_OF_2, save_fn=save)
    assert not job.ok and len(job.save_errors) == 1
    message = job.save_errors[0]
    assert "lat.safetensors: sample 2" in message and "00002-lat-2.png" in message
    assert os.strerror(errno.ENOSPC) in message
    assert [s.path.name for s in job.saved] == ["00000-lat-0.png", "00001-lat-1.png", "00003-lat-3.png"]
    assert sorted(os.listdir(tmp_path)) == ["00000-lat-0.png", "00001-lat-1.png", "00003-lat-3.png"]
    [failed] = job.failed_saves
    assert failed.index == 2 and failed.message == message and failed.image is not None
    assert np.array_equal(_pixels(failed.image), _pixels(_decoded(batch)[2]))
    assert infotext.parse(failed.infotext).params["VAE Batch"] == "on"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_folder_fails_every_write_and_keeps_every_image(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        job = decode_to_folder([_batch("lat", 3)], out, lambda fam: VAE)
    finally:
        out.chmod(0o700)
    assert not job.saved and len(job.failed_saves) == 3
    assert all(str(out) in f.message and f"sample {f.index}" in f.message for f in job.failed_saves)
    assert all(f.image is not None for f in job.failed_saves)


def test_a_vanished_output_folder_names_each_file_it_could_not_create(tmp_path):
    namer = SequentialNamer(tmp_path / "gone")
    (tmp_path / "gone").rmdir()  # e.g. a removed or unmounted output folder; root can't be refused
    job = decode_to_folder([_batch("v", 3)], tmp_path / "gone", lambda fam: VAE, save_fn=folder_saver(namer))
    assert not job.saved and len(job.failed_saves) == 3
    for k, failed in enumerate(job.failed_saves):
        assert failed.message.startswith(f"v.safetensors: sample {k}: could not save ")
        assert str(tmp_path / "gone") in failed.message and failed.image is not None


def test_unexpected_worker_errors_surface(tmp_path, caplog):
    inner = folder_saver(SequentialNamer(tmp_path / "w"))

    def buggy(job: WriteJob) -> Path:
        if job.seq == 1:
            raise ValueError("bug in the saver")
        return inner(job)

    writer = ImageWriter(buggy, workers=2)
    for i in range(3):
        writer.submit(_image(i), f"n{i}")
    with pytest.raises(WriterError, match="bug in the saver") as info:
        writer.close()
    results = info.value.results
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(info.value.__cause__, ValueError) and results[1].image is not None
    assert sorted(os.listdir(tmp_path / "w")) == ["00000-n0.png", "00001-n2.png"]  # no number used

    # Through decode_to_folder: recorded as a save error, logged with its traceback, image kept.
    def host(job: WriteJob) -> Path:
        if job.values["index"] == 1:
            raise TypeError("host save broke")
        return inner(job)

    with caplog.at_level(logging.ERROR, logger="vaebatch"):
        job = decode_to_folder([_batch("h", 3)], tmp_path / "h", lambda fam: VAE, save_fn=host)
    assert not job.ok and len(job.save_errors) == 1
    assert (
        "h.safetensors: sample 1" in job.save_errors[0] and "TypeError: host save broke" in job.save_errors[0]
    )
    assert job.failed_saves[0].image is not None
    assert any(r.exc_info and "host save broke" in str(r.exc_info[1]) for r in caplog.records)


def test_a_host_save_function_sees_the_request_and_runs_one_at_a_time_in_order(tmp_path):
    lock = threading.Lock()
    seen: list[tuple[int, str, str, int]] = []
    running = {"now": 0, "most": 0}

    def host(job: WriteJob) -> Path:
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        path = tmp_path / f"host-{job.seq}.{job.fmt}"
        job.image.save(path)
        seen.append((job.seq, job.decoration, job.fmt, int(job.values["index"])))
        assert job.infotext and "VAE Batch" in job.infotext
        with lock:
            running["now"] -= 1
        return path

    job = decode_to_folder(
        [_batch("g", 5)],
        tmp_path / "unused",
        lambda fam: VAE,
        fmt="webp",
        save_fn=host,
        writers=3,
        max_pending=4,
    )
    assert job.ok and [s.path.name for s in job.saved] == [f"host-{i}.webp" for i in range(5)]
    assert seen == [(i, f"g-{i}", "webp", i) for i in range(5)] and running["most"] == 1


def test_cancelling_still_writes_every_decoded_image(tmp_path):
    decoded = {"n": 0}

    def progress(done: int, total: int, text: str) -> None:
        decoded["n"] = done

    job = decode_to_folder(
        [_batch("c", 8)],
        tmp_path,
        lambda fam: VAE,
        options=CHUNKS_OF_2,
        writers=1,
        max_pending=1,
        progress=progress,
        cancel=lambda: decoded["n"] >= 4,
    )
    assert job.cancelled and 4 <= len(job.saved) < 8
    assert len(job.saved) == sum(r.done for r in job.files[0].result.reports)
    assert sorted(os.listdir(tmp_path)) == [f"{k:05}-c-{k}.png" for k in range(len(job.saved))]
