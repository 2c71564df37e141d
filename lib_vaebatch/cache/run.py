"""``cache`` jobs: manifest, plan, the shards still to do (in-process here, or on Ray through
:mod:`lib_vaebatch.cache.on_ray`), then the index. A rerun with the same settings skips every shard
whose records and files check out, and fills the gaps; other settings are refused unless
``overwrite``."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.cache import kohya
from lib_vaebatch.cache.settings import (
    CONFIG,
    INDEX,
    STATE,
    CacheConflictError,
    CacheSettings,
    ShardTask,
    differences,
    make_plan,
    plan_from_json,
    plan_to_json,
)
from lib_vaebatch.cache.shards import (
    LoadedShard,
    cache_engine_options,
    done_records,
    encode_shard,
    load_shard,
    write_json,
    write_shard,
)
from lib_vaebatch.cache.sources import Item, build_manifest, find_sources
from lib_vaebatch.engine.options import EngineOptions

log = logging.getLogger("vaebatch")

ProgressFn = Callable[[int, int, str], None]
INDEX_KEYS = ("source", "status", "bucket", "shard", "row", "original_size", "crop_ltrb", "npz", "error")


@dataclass
class CacheRun:
    """What a run found and did. ``records`` hold every image of the index, in index order."""

    out: Path
    total: int = 0
    skipped: int = 0  # images in shards already done
    encoded: int = 0  # images in shards this run wrote
    shards_written: int = 0
    shards_skipped: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    cancelled: bool = False

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.records)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "failed"]


def _own_kohya_files(out: Path) -> list[Path]:
    files = []
    for rec_file in (out / STATE / "records").rglob("*.json"):
        try:
            files += [Path(r["npz"]) for r in json.loads(rec_file.read_text())["records"] if "npz" in r]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return files


def reset(out: Path) -> None:
    """Remove what a cache wrote in ``out`` (and its kohya npz files); nothing else."""
    for path in _own_kohya_files(out):
        path.unlink(missing_ok=True)
    for d in out.iterdir() if out.is_dir() else []:
        if d.is_dir() and re.fullmatch(r"\d+x\d+", d.name):
            for f in d.glob("part-*.safetensors"):
                f.unlink()
            if not any(d.iterdir()):
                d.rmdir()
    shutil.rmtree(out / STATE, ignore_errors=True)
    for name in (INDEX, CONFIG):
        (out / name).unlink(missing_ok=True)


def open_out(out: Path, settings: CacheSettings, *, overwrite: bool) -> None:
    """Check (or start) ``out`` for these settings; a cache made otherwise is a
    :class:`CacheConflictError` naming the differences, unless ``overwrite``."""
    config = out / CONFIG
    want = settings.as_dict()
    if config.exists():
        try:
            have = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CacheConflictError(
                f"{config}: unreadable ({exc}); use --overwrite to start again"
            ) from None
        if have != want:
            if not overwrite:
                changes = "; ".join(differences(have, want))
                raise CacheConflictError(
                    f"{out} holds a cache made with other settings ({changes}); "
                    "use another output folder, or --overwrite to replace it"
                )
            reset(out)
        elif overwrite:
            reset(out)
    elif overwrite:
        reset(out)
    elif out.exists() and any(p.name in (INDEX, STATE) for p in out.iterdir()):
        raise CacheConflictError(f"{out} holds cache files without {CONFIG}; use --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.rglob(".*.tmp"):  # what a killed run was writing
        tmp.unlink(missing_ok=True)
    if not config.exists():
        write_json(config, want)


def load_plan(out: Path, items: list[Item], settings: CacheSettings) -> list[ShardTask]:
    path = out / STATE / "plan.json"
    old = None
    if path.exists():
        try:
            old = plan_from_json(json.loads(path.read_text(encoding="utf-8")), settings.fingerprint, path)
        except (OSError, ValueError):
            old = None
    plan = make_plan(items, settings, old)
    if old != plan:
        write_json(path, plan_to_json(plan, settings.fingerprint))
    return plan


def check_kohya_targets(pending: list[ShardTask], items: dict[str, Item], settings: CacheSettings) -> None:
    """sd-scripts would read an npz we did not write (another cache's, or the old ``<stem>.npz``)
    instead of ours, or we would overwrite it: refuse, naming them."""
    family = settings.vae["family"]
    foreign: list[str] = []
    for task in pending:
        for key in task.members:
            item = items[key]
            target = kohya.npz_path(item.source.path, item.size, family)
            for tmp in target.parent.glob(f".{target.name}.*.tmp"):  # a killed run's, next to the image
                tmp.unlink(missing_ok=True)
            if target.exists() and kohya.marker(target) is None:
                foreign.append(str(target))
            old = kohya.old_npz_path(item.source.path)
            if old.exists():
                foreign.append(f"{old} (sd-scripts would read it instead)")
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise CacheConflictError(
            f"{len(foreign)} npz file(s) that this cache did not write are in the way: "
            f"{', '.join(foreign[:3])}{more}; move them away first"
        )


def index_records(
    plan: list[ShardTask], items: list[Item], done: dict[str, list[dict[str, Any]]]
) -> list[dict]:
    """One record per image: header failures from the manifest, the rest from done shards; in
    (SRC, path) order. Images of shards not done (an interrupted run) are left out."""
    by_key: dict[str, dict[str, Any]] = {}
    for recs in done.values():
        for r in recs:
            by_key[r["key"]] = r
    multi = len({i.source.root for i in items}) > 1
    out = []
    for item in sorted(items, key=lambda i: (i.source.root, i.source.rel)):
        rec = by_key.get(item.source.key)
        if item.error is not None:
            rec = {"source": item.source.rel, "status": "failed", "error": item.error}
        if rec is None:
            continue
        line = {k: rec[k] for k in INDEX_KEYS if k in rec}
        if multi:
            line["root"] = item.source.root
        out.append(line)
    return out


def prefetch(
    loader: Callable[[ShardTask], LoadedShard], tasks: list[ShardTask], workers: int
) -> Iterator[LoadedShard]:
    """``loader`` over ``tasks`` in order, up to ``workers`` shards ahead (decoding overlaps the encode)."""
    if workers <= 0:
        yield from map(loader, tasks)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vaebatch-load") as pool:
        futures = [pool.submit(loader, t) for t in tasks[: workers + 1]]
        nxt = len(futures)
        for i in range(len(tasks)):
            loaded = futures[i].result()
            if nxt < len(tasks):
                futures.append(pool.submit(loader, tasks[nxt]))
                nxt += 1
            futures[i] = None  # type: ignore[call-overload]
            yield loaded


def run_cache(
    srcs: list[str | Path],
    out: str | Path,
    settings: CacheSettings,
    *,
    backend: VAEBackend | None = None,
    options: EngineOptions | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    loaders: int = 2,
    threads: int = 1,
    ray: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
) -> CacheRun:
    """Run (or resume) a cache job. ``ray``: the keyword arguments of
    :func:`lib_vaebatch.cache.on_ray.run_on_ray` (then ``backend`` is not needed here; the actors
    load the VAE themselves), else in this process with ``backend``. On the CPU the encode runs on
    ``threads`` threads (in-process and in each Ray actor): latents are bit-identical for the same
    count, and differ in the last bits for another (the order of float sums changes)."""
    out = Path(out)
    if settings.format == "kohya":
        kohya.check_family(settings.vae["family"])
    sources = find_sources(list(srcs), exclude=out)
    items = build_manifest(sources, settings.buckets, orient=settings.orient)
    by_key = {i.source.key: i for i in items}
    open_out(out, settings, overwrite=overwrite)
    plan = load_plan(out, items, settings)
    done: dict[str, list[dict[str, Any]]] = {}
    pending: list[ShardTask] = []
    for task in plan:
        recs = done_records(out, task, by_key, settings)
        if recs is None:
            pending.append(task)
        else:
            done[task.name] = recs
    if settings.format == "kohya":
        check_kohya_targets(pending, by_key, settings)
    run = CacheRun(out, total=len(items))
    run.shards_skipped = len(done)
    run.skipped = sum(len(v) for v in done.values())
    todo = sum(len(t.members) for t in pending)
    if progress is not None:
        progress(0, todo, "cache")
    if pending and ray is not None:
        from lib_vaebatch.cache.on_ray import run_on_ray

        written = run_on_ray(
            out, pending, by_key, settings, progress=progress, total=todo, threads=threads, **ray
        )
        for task in written:
            recs = done_records(out, task, by_key, settings)
            if recs is None:
                raise RuntimeError(f"{task.name}: the Ray job finished but its files do not check out")
            done[task.name] = recs
            run.shards_written += 1
            run.encoded += len(task.members)
    elif pending:
        if backend is None:
            raise ValueError("run_cache needs a backend (or ray=...)")
        opts = cache_engine_options(options, batch_size)
        previous_threads = torch.get_num_threads()
        if backend.device.type == "cpu":
            torch.set_num_threads(threads)

        def loader(task: ShardTask) -> LoadedShard:
            return load_shard(task, by_key, settings)

        try:
            for loaded in prefetch(loader, pending, loaders):
                if cancel is not None and cancel():
                    run.cancelled = True
                    break
                encoded = encode_shard(backend, loaded, settings, opts)
                write_shard(out, encoded, settings)
                done[loaded.task.name] = encoded.records
                run.shards_written += 1
                run.encoded += len(loaded.task.members)
                if progress is not None:
                    progress(run.encoded, todo, "cache")
        finally:
            torch.set_num_threads(previous_threads)
    run.records = index_records(plan, items, done)
    write_json(out / INDEX, run.records, lines=True)
    for tmp in out.rglob(".*.tmp"):  # a killed run's writer that was still going when this one began
        tmp.unlink(missing_ok=True)
    return run
