from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lib_vaebatch import cli
from tests.cache.dataset import make_dataset
from tests.support import save_module, tiny_autoencoder

ROOT = Path(__file__).resolve().parents[2]

#: Small buckets (areas around 64²) keep the tiny VAE's encode at a few ms an image.
BUCKETS = [
    "--resolution",
    "64",
    "--min-bucket-reso",
    "32",
    "--max-bucket-reso",
    "128",
    "--bucket-reso-steps",
    "32",
]


def cache_args(src: Path, out: Path, vae: Path, *extra: str) -> list[str]:
    return ["cache", str(src), "-o", str(out), "--vae", str(vae), *BUCKETS, "--shard-size", "8",
            "--no-progress", *extra]  # fmt: skip


def run_cache_cli(*args: str) -> int:
    return cli.main(list(args))


def spawn_cache(*args: str) -> subprocess.Popen[str]:
    """The CLI in a child process (its own process group, so a SIGKILL takes it alone)."""
    return subprocess.Popen(
        [sys.executable, "-m", "lib_vaebatch", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def records_done(out: Path) -> int:
    return len(list((out / ".vaebatch" / "records").rglob("*.json")))


def wait_for(cond, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) first:\n{proc.stdout.read()}")  # type: ignore[union-attr]
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


def sigkill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def index_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def vae_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_module(tiny_autoencoder(4, seed=11), tmp_path_factory.mktemp("vae") / "tiny-vae.safetensors")


@pytest.fixture(scope="session")
def other_vae_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_module(
        tiny_autoencoder(4, seed=12), tmp_path_factory.mktemp("vae2") / "other-vae.safetensors"
    )


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~100 images of mixed sizes and kinds, 5 of them bad (see tests/cache/dataset.py)."""
    root = tmp_path_factory.mktemp("dataset")
    make_dataset(root)
    return root


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, dataset: Path, vae_file: Path) -> Path:
    """One uninterrupted in-process run over :func:`dataset`: what every other run must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_cache_cli(*cache_args(dataset, out, vae_file)) == cli.EXIT_FAILED  # the bad files
    return out


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One local Ray instance (2 CPUs) for every Ray test; CLI children join it with --ray ADDRESS."""
    ray = pytest.importorskip("ray", reason="Ray is not installed here (pip install '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def shard_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("part-*.safetensors"))


def assert_same_cache(a: Path, b: Path) -> None:
    """The same index and the same shard files: every tensor bit for bit, the same metadata; no
    temporary files left."""
    from safetensors import safe_open

    assert index_lines(a) == index_lines(b)
    assert shard_files(a) == shard_files(b) and shard_files(a)
    for rel in shard_files(a):
        with safe_open(str(a / rel), "pt") as fa, safe_open(str(b / rel), "pt") as fb:
            assert fa.metadata() == fb.metadata(), rel
            assert sorted(fa.keys()) == sorted(fb.keys()), rel
            for key in fa.keys():  # noqa: SIM118
                x, y = fa.get_tensor(key), fb.get_tensor(key)
                assert x.dtype == y.dtype and x.shape == y.shape and x.equal(y), f"{rel}: {key} differs"
    assert not list(b.rglob("*.tmp"))
