"""One shard's life: load its images (CPU), encode them (the engine), write the shard and its
records (temp name, then rename), and check on a rerun whether that already happened.

The same three functions run in-process and inside Ray tasks and actors, so both give the same
files. Everything passed between the stages is plain numpy and JSON (:meth:`to_row`)."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.cache import kohya
from lib_vaebatch.cache.prepare import prepare_item
from lib_vaebatch.cache.settings import STATE, CacheSettings, ShardTask
from lib_vaebatch.cache.sources import Item, seed_offset
from lib_vaebatch.engine.encode import encode_pixels
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.families import to_raw
from lib_vaebatch.images import ImageInputError
from lib_vaebatch.latents import TENSOR, LatentBatch
from lib_vaebatch.tensorfile import TensorFileError, read_header

FLIPPED = "latents_flipped"
MASK = "alpha_mask"
_STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ST_DTYPE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def vae_identity(backend: VAEBackend) -> dict[str, Any]:
    return {
        "name": backend.display_name,
        "hash": backend.file_hash,
        "family": backend.family.name,
        "scaling_factor": float(backend.scaling_factor),
        "shift_factor": float(backend.shift_factor or 0.0),
        "channels": int(backend.latent_channels),
    }


def cache_engine_options(options: EngineOptions | None, batch_size: int) -> EngineOptions:
    """The engine's options for a cache: at most ``batch_size`` images a chunk, and the contiguous
    CPU layout (the timing-based probe could pick another layout in another process, and a shard
    must come out the same whichever worker or run encodes it)."""
    base = options or EngineOptions()
    return base.replace(max_chunk=min(base.max_chunk or batch_size, batch_size), cpu_layout="contiguous")


def _atomic_write(path: Path, write) -> None:  # type: ignore[no-untyped-def]
    """``write(tmp)`` then rename over ``path``: readers and reruns see the old file or the new one,
    never half of one (a killed run leaves only a ``.tmp`` that the next run removes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, value: Any, *, lines: bool = False) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            if lines:
                f.writelines(json.dumps(v, separators=(", ", ": ")) + "\n" for v in value)
            else:
                json.dump(value, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)


def records_path(out: Path, task: ShardTask) -> Path:
    return out / STATE / "records" / f"{task.name}.json"


@dataclass
class LoadedShard:
    """A shard's images as pixels: ``pixels`` [n, 3, H, W] uint8 for the ``ok`` members (in member
    order), and one entry per member in ``infos`` (source, error or original size and crop)."""

    task: ShardTask
    pixels: np.ndarray
    masks: np.ndarray | None
    infos: list[dict[str, Any]]

    def to_row(self) -> dict[str, Any]:
        return {
            "task": json.dumps([self.task.name, list(self.task.bucket), list(self.task.members)]),
            "pixels": self.pixels,
            "masks": self.masks if self.masks is not None else np.zeros((0,), np.float32),
            "has_masks": self.masks is not None,
            "infos": json.dumps(self.infos),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> LoadedShard:
        name, bucket, members = json.loads(str(row["task"]))
        masks = np.asarray(row["masks"], dtype=np.float32) if bool(row["has_masks"]) else None
        return cls(
            ShardTask(name, (bucket[0], bucket[1]), tuple(members)),
            np.asarray(row["pixels"], dtype=np.uint8),
            masks,
            json.loads(str(row["infos"])),
        )


def load_shard(task: ShardTask, items: dict[str, Item], settings: CacheSettings) -> LoadedShard:
    """Decode, orient, crop and resize every member; a bad image is an ``error`` in its info."""
    w, h = task.bucket
    pixels, masks, infos = [], [], []
    for key in task.members:
        item = items[key]
        info: dict[str, Any] = {
            "key": key,
            "rel": item.source.rel,
            "path": str(item.source.path),
            "stat": list(item.stat),
        }
        try:
            prep = prepare_item(
                item, alpha=settings.alpha, background=settings.background, orient=settings.orient
            )
        except ImageInputError as exc:
            info["error"] = str(exc).removeprefix(f"{item.source.path}: ")
        except (OSError, ValueError, MemoryError) as exc:  # a decoder failing past its header checks
            info["error"] = f"cannot decode ({type(exc).__name__}: {exc})"
        else:
            pixels.append(prep.pixels)
            if prep.mask is not None:
                masks.append(prep.mask)
            info["original_size"] = list(prep.original_size)
            info["crop_ltrb"] = list(prep.crop_ltrb)
        infos.append(info)
    stack = np.stack(pixels) if pixels else np.zeros((0, 3, h, w), np.uint8)
    mask_stack = None
    if settings.alpha == "mask":
        mask_stack = np.stack(masks) if masks else np.zeros((0, h, w), np.float32)
    return LoadedShard(task, stack, mask_stack, infos)


@dataclass
class EncodedShard:
    """Latents (float32, in the format's space: scaled for ours, raw for kohya) of the members that
    encoded, and one index record per member."""

    task: ShardTask
    latents: np.ndarray
    flipped: np.ndarray | None
    masks: np.ndarray | None
    records: list[dict[str, Any]]

    def to_row(self) -> dict[str, Any]:
        empty = np.zeros((0,), np.float32)
        return {
            "task": json.dumps([self.task.name, list(self.task.bucket), list(self.task.members)]),
            "latents": self.latents,
            "flipped": self.flipped if self.flipped is not None else empty,
            "has_flipped": self.flipped is not None,
            "masks": self.masks if self.masks is not None else empty,
            "has_masks": self.masks is not None,
            "records": json.dumps(self.records),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> EncodedShard:
        name, bucket, members = json.loads(str(row["task"]))
        return cls(
            ShardTask(name, (bucket[0], bucket[1]), tuple(members)),
            np.asarray(row["latents"], dtype=np.float32),
            np.asarray(row["flipped"], dtype=np.float32) if bool(row["has_flipped"]) else None,
            np.asarray(row["masks"], dtype=np.float32) if bool(row["has_masks"]) else None,
            json.loads(str(row["records"])),
        )


def _encode(
    backend: VAEBackend,
    pixels: torch.Tensor,
    seeds: list[int],
    settings: CacheSettings,
    options: EngineOptions,
) -> tuple[list[torch.Tensor | None], list[Any]]:
    result = encode_pixels(
        backend, pixels, sample=settings.sample, seed=0, seed_offsets=seeds, options=options
    )
    outs: list[torch.Tensor | None] = []
    for k, rep in enumerate(result.reports):
        z = result.outputs[k] if rep.done else None
        if z is not None and settings.format == "kohya":  # sd-scripts caches the VAE's raw latents
            z = to_raw(z.float(), backend.scaling_factor, backend.shift_factor)
        outs.append(None if z is None else z.float().cpu())
    return outs, result.reports


def encode_shard(
    backend: VAEBackend, loaded: LoadedShard, settings: CacheSettings, options: EngineOptions
) -> EncodedShard:
    task = loaded.task
    good = [i for i, info in enumerate(loaded.infos) if "error" not in info]
    pixels = torch.from_numpy(np.array(loaded.pixels, dtype=np.uint8, order="C"))  # a writable copy
    seeds = [seed_offset(loaded.infos[i]["rel"], settings.seed) for i in good]
    outs, reports = _encode(backend, pixels, seeds, settings, options) if good else ([], [])
    flip_outs: list[torch.Tensor | None] = [None] * len(good)
    flip_reports: list[Any] = [None] * len(good)
    if settings.flip and good:
        flip_seeds = [seed_offset(loaded.infos[i]["rel"], settings.seed, "flip") for i in good]
        flip_outs, flip_reports = _encode(
            backend, torch.flip(pixels, dims=[3]), flip_seeds, settings, options
        )
    records: list[dict[str, Any]] = []
    keep: list[int] = []
    by_member = {m: g for g, m in enumerate(good)}
    for i, info in enumerate(loaded.infos):
        rec: dict[str, Any] = {"key": info["key"], "source": info["rel"], "path": info["path"]}
        rec["stat"] = info["stat"]
        rec["bucket"] = list(task.bucket)
        g = by_member.get(i)
        problem = info.get("error")
        if g is not None:
            reps = [reports[g]] + ([flip_reports[g]] if settings.flip else [])
            failed = [r for r in reps if not r.done]
            if failed:
                problem = f"encode failed: {failed[0].message or failed[0].status.value}"
            else:
                keep.append(g)
                rec["status"] = "recovered" if any(r.status.value == "recovered" for r in reps) else "ok"
                rec["original_size"] = info["original_size"]
                rec["crop_ltrb"] = info["crop_ltrb"]
        if problem is not None:
            rec.update(status="failed", error=problem)
        records.append(rec)
    c, (w, h) = int(backend.latent_channels), task.bucket
    shape = (0, c, h // backend.downscale, w // backend.downscale)

    def stack(ts: list[torch.Tensor | None]) -> np.ndarray:
        return torch.stack([ts[g] for g in keep]).numpy() if keep else np.zeros(shape, np.float32)  # type: ignore[misc]

    masks = None
    if loaded.masks is not None:
        masks = loaded.masks[keep] if keep else np.zeros((0, h, w), np.float32)
    return EncodedShard(task, stack(outs), stack(flip_outs) if settings.flip else None, masks, records)


def _ok(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] in ("ok", "recovered")]


def write_shard(out: Path, encoded: EncodedShard, settings: CacheSettings) -> None:
    """The shard's files, then its records: once the records exist the shard is done. Rewriting a
    shard (a retried Ray task, a rerun after a kill between the two) writes the same bytes."""
    task, fp = encoded.task, settings.fingerprint
    ok = _ok(encoded.records)
    if settings.format == "kohya":
        for row, rec in enumerate(ok):
            path = kohya.npz_path(Path(rec["path"]), tuple(rec["original_size"]), settings.vae["family"])
            arrays = kohya.arrays(
                encoded.latents[row],
                rec["original_size"],
                rec["crop_ltrb"],
                None if encoded.flipped is None else encoded.flipped[row],
                None if encoded.masks is None else encoded.masks[row],
                fp,
            )
            _atomic_write(path, lambda tmp, a=arrays: kohya.save(tmp, a))
            rec["npz"] = str(path)
    elif ok:
        from safetensors.torch import save_file

        dtype = _STORAGE[settings.storage]

        def tensor(a: np.ndarray, dt: torch.dtype) -> torch.Tensor:  # Ray hands out read-only arrays
            return torch.from_numpy(np.array(a, dtype=np.float32, order="C")).to(dt).contiguous()

        tensors = {TENSOR: tensor(encoded.latents, dtype)}
        if encoded.flipped is not None:
            tensors[FLIPPED] = tensor(encoded.flipped, dtype)
        if encoded.masks is not None:
            tensors[MASK] = tensor(encoded.masks, torch.float32)
        vae = settings.vae
        meta = LatentBatch(
            latents=tensors[TENSOR],
            scaled=True,
            family=vae["family"],
            scaling_factor=vae["scaling_factor"],
            shift_factor=vae["shift_factor"],
            sources=[r["source"] for r in ok],
            sizes=[tuple(r["original_size"]) for r in ok],
            vae_name=vae["name"],
            vae_hash=vae["hash"],
            extra={
                "crops": json.dumps([r["crop_ltrb"] for r in ok]),
                "cache_fingerprint": fp,
                "value": "sample" if settings.sample else "mean",
            },
        ).metadata()
        _atomic_write(out / task.file, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    for row, rec in enumerate(ok):
        if settings.format != "kohya":
            rec.update(shard=task.file, row=row)
    write_json(records_path(out, task), {"fingerprint": fp, "shard": task.name, "records": encoded.records})


def done_records(
    out: Path, task: ShardTask, items: dict[str, Item], settings: CacheSettings
) -> list[dict[str, Any]] | None:
    """The shard's records if it is complete and current: records for exactly its members, each
    file unchanged since (size, mtime), and its output files present with the shapes, sources and
    fingerprint the records promise. None: (re)encode it."""
    fp = settings.fingerprint
    try:
        data = json.loads(records_path(out, task).read_text(encoding="utf-8"))
        records = data["records"]
        if data.get("fingerprint") != fp or [r["key"] for r in records] != list(task.members):
            return None
        if any(list(items[r["key"]].stat) != r["stat"] for r in records):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = _ok(records)
    c = int(settings.vae["channels"])
    w, h = task.bucket
    if settings.format == "kohya":
        return (
            records
            if all(kohya.valid(Path(r["npz"]), settings, (c, h // 8, w // 8), fp) for r in ok)
            else None
        )
    if not ok:
        return records
    try:
        infos, meta = read_header(out / task.file)
    except TensorFileError:
        return None
    want = {TENSOR: (len(ok), c, h // 8, w // 8)}
    if settings.flip:
        want[FLIPPED] = want[TENSOR]
    if settings.alpha == "mask":
        want[MASK] = (len(ok), h, w)
    for name, shape in want.items():
        info = infos.get(name)
        if info is None or info.shape != shape:
            return None
        if name != MASK and info.dtype != _ST_DTYPE[settings.storage]:
            return None
    if meta.get("cache_fingerprint") != fp or meta.get("sources") != json.dumps([r["source"] for r in ok]):
        return None
    return records
