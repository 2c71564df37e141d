"""The cache job on Ray Data (``cache --ray``): the same shards, the same files, spread over a local
Ray instance or a cluster. ``ray`` is imported inside these functions only: importing
lib_vaebatch never imports it, and without it the in-process path is untouched.

Pipeline, one row per shard (so every encode batch has one bucket shape):

1. the manifest's pending shards, each with its members' paths, headers and buckets, as a dataset;
2. ``map`` CPU tasks: decode, orient, resize, crop (:func:`~lib_vaebatch.cache.shards.load_shard`);
3. ``map_batches`` with :class:`EncodeActor`, a pool of ``workers`` actors that load the VAE once
   and run our engine (GPUs per actor from ``gpus_per_worker``; CPU actors where there is none);
4. ``write_datasink``: each shard's files and records, written to temporary names and renamed
   under names fixed by the plan, so a retried task rewrites the same files and never adds any.

Actors are restarted and their tasks retried when a worker process dies (``max_restarts=-1``,
``max_task_retries=-1``); a dead driver is covered by the rerun, which skips finished shards.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lib_vaebatch.cache.settings import CacheSettings, ShardTask
from lib_vaebatch.cache.shards import EncodedShard, LoadedShard, load_shard, records_path, write_shard
from lib_vaebatch.cache.sources import Item, Source
from lib_vaebatch.engine.options import EngineOptions

SIDE_CPUS = (
    0.25  # what a load or write task reserves: light next to an encode, and Ray Data bounds how many run
)


class RayUnavailableError(RuntimeError):
    """``--ray`` without Ray installed."""


def _item_to_json(item: Item) -> dict[str, Any]:
    s = item.source
    return {
        "path": str(s.path), "root": s.root, "rel": s.rel, "size": list(item.size), "stat": list(item.stat),
        "bucket": list(item.bucket or ()), "resized": list(item.resized or ()),
    }  # fmt: skip


def _item_from_json(d: dict[str, Any]) -> Item:
    pair = lambda v: (int(v[0]), int(v[1]))  # noqa: E731
    return Item(
        Source(Path(d["path"]), int(d["root"]), str(d["rel"])),
        pair(d["size"]), pair(d["stat"]), pair(d["bucket"]), pair(d["resized"]),
    )  # fmt: skip


def task_row(task: ShardTask, items: dict[str, Item]) -> dict[str, Any]:
    return {
        "task": json.dumps([task.name, list(task.bucket), list(task.members)]),
        "items": json.dumps([_item_to_json(items[k]) for k in task.members]),
    }


def load_row(row: dict[str, Any], settings: CacheSettings) -> dict[str, Any]:
    """Stage 2 (a plain Ray task per shard row)."""
    name, bucket, members = json.loads(str(row["task"]))
    task = ShardTask(name, (bucket[0], bucket[1]), tuple(members))
    items = {i.source.key: i for i in map(_item_from_json, json.loads(str(row["items"])))}
    return load_shard(task, items, settings).to_row()


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(next(iter(batch.values())))
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _batch(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in rows[0]:
        values = [r[k] for r in rows]
        if isinstance(values[0], np.ndarray):
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[k] = arr if len(values) > 1 else values[0][None]
        else:
            out[k] = np.array(values)
    return out


class EncodeActor:
    """Stage 3: loads the VAE once per actor, then encodes one shard a call with our engine."""

    def __init__(
        self,
        vae: str,
        family: str | None,
        dtype: str | None,
        settings: CacheSettings,
        options: EngineOptions,
        use_gpu: bool,
        threads: int = 1,
    ) -> None:
        import torch

        from lib_vaebatch.backends import load_vae
        from lib_vaebatch.cache.shards import vae_identity
        from lib_vaebatch.devices import parse_dtype

        torch_dtype = parse_dtype(dtype) if dtype else None
        self.backend = load_vae(vae, family=family, device="cuda" if use_gpu else "cpu", dtype=torch_dtype)
        if torch_dtype is not None:
            self.backend.set_dtype(torch_dtype)
        if vae_identity(self.backend) != settings.vae:
            raise RuntimeError(f"{vae}: this worker loads another VAE than the driver ({settings.vae})")
        if not use_gpu:
            torch.set_num_threads(threads)  # as in-process: the same float summation order
        self.settings = settings
        self.options = options

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from lib_vaebatch.cache.shards import encode_shard

        outs = [
            encode_shard(self.backend, LoadedShard.from_row(r), self.settings, self.options).to_row()
            for r in _rows(batch)
        ]
        return _batch(outs)


def _sink(out: Path, settings: CacheSettings):  # type: ignore[no-untyped-def]  # -> a ray Datasink
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class ShardDatasink(Datasink):  # type: ignore[misc]
        """Stage 4: idempotent, since every file name comes from the plan."""

        def write(self, blocks: Any, ctx: Any) -> list[str]:
            names = []
            for block in blocks:
                for row in BlockAccessor.for_block(block).iter_rows(public_row_format=False):
                    encoded = EncodedShard.from_row(dict(row))
                    write_shard(out, encoded, settings)
                    names.append(encoded.task.name)
            return names

    return ShardDatasink()


def _watch(out: Path, pending: list[ShardTask], total: int, progress: Any, stop: threading.Event) -> None:
    """Progress from the records files appearing (the driver sees the work only at the end)."""
    while not stop.wait(0.5):
        done = sum(len(t.members) for t in pending if records_path(out, t).exists())
        progress(done, total, "cache")


def run_on_ray(
    out: Path,
    pending: list[ShardTask],
    items: dict[str, Item],
    settings: CacheSettings,
    *,
    vae: str,
    family: str | None = None,
    dtype: str | None = None,
    options: EngineOptions | None = None,
    address: str | None = None,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    num_cpus: int | None = None,
    threads: int = 1,
    progress: Any = None,
    total: int = 0,
) -> list[ShardTask]:
    """Encode ``pending`` on Ray; returns the shards written (all of them, or it raises)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayUnavailableError(
            f"--ray needs Ray Data ({exc}); pip install 'sd-webui-vae-batch[ray]'"
        ) from None
    from lib_vaebatch.cache.shards import cache_engine_options

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if address:
            kwargs["address"] = address
        elif num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours reports images; Ray's would interleave with it
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    gpw = gpus_per_worker if gpus_per_worker is not None else (1.0 if gpus else 0.0)
    # CPU actors reserve their threads, but never all CPUs: loading and writing need a share, or
    # they would wait for CPUs forever (the threads themselves are set in the actor)
    actor_cpus = 1.0 if gpw > 0 else min(float(threads), max(0.1, (cpus - SIDE_CPUS) / workers))
    opts = options or cache_engine_options(None, 8)
    rows = [task_row(t, items) for t in pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map(
        load_row,
        fn_kwargs={"settings": settings},
        num_cpus=SIDE_CPUS,
        compute=ray.data.TaskPoolStrategy(size=workers),
    )
    ds = ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={
            "vae": vae, "family": family, "dtype": dtype, "settings": settings, "options": opts,
            "use_gpu": gpw > 0, "threads": threads,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpw,
        num_cpus=actor_cpus,
        max_restarts=-1,
        max_task_retries=-1,
    )  # fmt: skip
    stop = threading.Event()
    watcher = None
    if progress is not None:
        watcher = threading.Thread(target=_watch, args=(out, pending, total, progress, stop), daemon=True)
        watcher.start()
    try:
        # writes reserve no CPU: they are light (see docs/benchmarks.md), and with a share to wait
        # for they were held back behind the encodes, so records came only at the end of a job
        ds.write_datasink(_sink(out, settings), ray_remote_args={"num_cpus": 0})
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
    return pending
