"""``python -m lib_vaebatch``: encode images to latents, decode latents to images, cache a training
set's latents, run the demo.

Exit codes: 0 all done; 1 some samples failed or could not be saved (every good one is saved);
2 bad input or usage (nothing written); 3 unexpected error (a bug: one line naming the exception;
``-v`` adds the traceback); 130 interrupted (finished samples are kept).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from lib_vaebatch import __version__
from lib_vaebatch.log import PREFIX, setup_console

log = logging.getLogger("vaebatch")

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EXIT_STATUS_HELP = """exit status:
  0    all done
  1    some samples failed or could not be saved (every good one is saved)
  2    bad input or usage: one line naming the file and the problem; nothing written
  3    unexpected error (a bug): one line naming the exception (-v adds the traceback)
  130  interrupted (finished samples are kept)"""


class CliError(Exception):
    """One line for the user, then exit 2."""


def _chunk(value: str) -> str | int:
    v = value.strip().lower()
    if v in ("auto", "per-sample"):
        return v
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--chunk takes auto, per-sample or a positive number, not {value!r}"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError("--chunk must be at least 1")
    return n


def _tile_size(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--tile-size takes a number of latent pixels, not {value!r}"
        ) from None
    if n < 8:
        raise argparse.ArgumentTypeError(
            "--tile-size is in latent pixels (image pixels / 8) and must be at least 8"
        )
    return n


def _int_in(low: int, high: int):  # -> argparse type (argparse names the option in its message)
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number, not {value!r}") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"must be within {low}..{high}, not {n}")
        return n

    return parse


def _verbose(p: argparse.ArgumentParser) -> None:
    # accepted after the subcommand too; SUPPRESS keeps the top-level default when absent
    p.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show engine events"
    )


def _common(p: argparse.ArgumentParser) -> None:
    from lib_vaebatch.families import FAMILY_NAMES

    g = p.add_argument_group("VAE and engine")
    g.add_argument(
        "--vae",
        default="approx",
        metavar="approx|PATH",
        help="'approx' (built-in, preview quality; default) or a .safetensors VAE / diffusers folder",
    )
    g.add_argument("--family", choices=FAMILY_NAMES, help="model family (default: detected)")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on GPU, fp32 on CPU), fp16, bf16, fp32")
    g.add_argument(
        "--chunk",
        type=_chunk,
        default="auto",
        help="samples per chunk: auto (planned from free memory; default), per-sample, or a maximum N",
    )
    g.add_argument(
        "--ladder",
        default="bf16,fp32",
        help="precisions to retry non-finite samples in (default bf16,fp32; '' disables)",
    )
    g.add_argument("--no-nan-check", action="store_true", help="do not check outputs for NaN/Inf")
    g.add_argument(
        "--keep-precision",
        action="store_true",
        help="after a recovery, keep the recovered precision for the rest of the run's files",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    _verbose(p)
    t = p.add_argument_group("tiling")
    t.add_argument(
        "--tiling",
        choices=("auto", "always", "never"),
        default="auto",
        help="auto (default): tile only when a sample does not fit (planned, or after out of memory); "
        "always; never",
    )
    t.add_argument(
        "--tile-mode",
        choices=("exact", "exact-lean", "fast", "auto", "plain"),
        default="exact",
        help="exact (default): same output as untiled (spilling whole values to a temporary file, "
        "or recomputing parts, where memory is short); exact-lean: exact, recomputing only (no "
        "spill file, as --no-spill); fast: statistics estimated; auto: exact where it fits, "
        "else fast; plain: independent tiles (the peers' method, not exact)",
    )
    t.add_argument(
        "--tile-size",
        type=_tile_size,
        default=None,
        metavar="N",
        help="tile side in latent pixels (image pixels / 8), at least 8 (default: planned from free memory)",
    )
    t.add_argument(
        "--no-spill",
        action="store_true",
        help="never keep whole values in a temporary file ($VAEBATCH_SPILL_DIR, else the system's temp "
        "directory) when memory is short: recompute instead (slower)",
    )


def build_parser() -> argparse.ArgumentParser:
    from lib_vaebatch.families import FAMILY_NAMES

    parser = argparse.ArgumentParser(
        prog="python -m lib_vaebatch",
        description="VAE Batch: batch VAE encode/decode that never loses a batch.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"VAE Batch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show engine events")
    sub = parser.add_subparsers(dest="command", required=True)

    enc = sub.add_parser("encode", help="encode images into latents files (one per image size)")
    enc.add_argument("images", nargs="+", help="image files or folders of images")
    enc.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT.safetensors",
        help="output file; several sizes give OUT-<W>x<H>.safetensors",
    )
    enc.add_argument(
        "--fit",
        choices=("crop", "resize"),
        default="crop",
        help="make sizes multiples of 8 by centre crop (default) or resize",
    )
    enc.add_argument(
        "--alpha",
        choices=("composite", "drop"),
        default="composite",
        help="composite transparency on --background (default) or drop it",
    )
    enc.add_argument(
        "--background", default="#ffffff", help="colour under transparent pixels (default white)"
    )
    enc.add_argument(
        "--sample", action="store_true", help="sample the posterior (seeded) instead of its mean"
    )
    enc.add_argument("--seed", type=int, default=0, help="seed for --sample (image i uses seed+i)")
    enc.add_argument("--half", action="store_true", help="store float16 latents")
    enc.add_argument("--comfy", action="store_true", help="also write ComfyUI .latent files")
    enc.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _common(enc)

    dec = sub.add_parser("decode", help="decode latents files into images")
    dec.add_argument("latents", nargs="+", help="latents files: ours (.safetensors), ComfyUI .latent, .npy")
    dec.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the images")
    dec.add_argument(
        "--pattern",
        help="file name pattern with webui tokens, e.g. '[seed]-[prompt_words]' "
        "(default: <source stem>-<index>); a sequence number is always prefixed",
    )
    dec.add_argument(
        "--format", default="png", choices=("png", "jpg", "webp"), help="image format (default png)"
    )
    dec.add_argument("--quality", type=_int_in(1, 100), default=95, help="JPEG/WebP quality (default 95)")
    _common(dec)

    cache = sub.add_parser(
        "cache",
        help="cache a training set's latents: aspect buckets, shards or kohya npz, resumable, Ray",
        description="Encode every image under SRC (folders searched recursively; a .txt or .json list of "
        "paths works too) into a latents cache in OUT: OUT/<W>x<H>/part-<k>.safetensors shards and "
        "OUT/index.jsonl (or, with --format kohya, the .npz files sd-scripts reads, next to each image). "
        "A rerun with the same settings skips what is done and fills the gaps.",
    )
    cache.add_argument("sources", nargs="+", metavar="SRC", help="folders, image files, or .txt/.json lists")
    cache.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    b = cache.add_argument_group("buckets (as kohya-ss/sd-scripts makes them)")
    b.add_argument("--resolution", type=_int_in(8, 1 << 15), default=512, help="max area N² (default 512)")
    b.add_argument("--bucket-reso-steps", type=_int_in(8, 4096), default=64, help="bucket step (default 64)")
    b.add_argument("--min-bucket-reso", type=_int_in(8, 1 << 15), default=256, help="(default 256)")
    b.add_argument("--max-bucket-reso", type=_int_in(8, 1 << 15), default=1024, help="(default 1024)")
    b.add_argument("--no-upscale", action="store_true", help="buckets from each image's size, never enlarged")
    c = cache.add_argument_group("what is stored")
    c.add_argument(
        "--format",
        choices=("latents", "kohya"),
        default="latents",
        help="latents (default): our shards + index.jsonl; kohya: sd-scripts' .npz next to each image",
    )
    c.add_argument("--flip", action="store_true", help="also encode the mirrored image")
    c.add_argument(
        "--alpha",
        choices=("drop", "composite", "mask"),
        default="drop",
        help="transparency: drop it (default, as sd-scripts), composite on --background, or store a mask",
    )
    c.add_argument("--background", default="#ffffff", help="colour for --alpha composite (default white)")
    c.add_argument("--sample", action="store_true", help="sample the posterior instead of its mean")
    c.add_argument("--seed", type=int, default=0, help="seed for --sample (each image's from its path)")
    store = c.add_mutually_exclusive_group()
    store.add_argument("--half", action="store_true", help="store float16 latents")
    store.add_argument("--bf16", action="store_true", help="store bfloat16 latents")
    c.add_argument("--shard-size", type=_int_in(1, 1 << 20), default=256, help="images per shard (256)")
    c.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")
    r = cache.add_argument_group("throughput")
    r.add_argument("--batch-size", type=_int_in(1, 4096), default=8, help="images per VAE call (default 8)")
    r.add_argument("--loaders", type=_int_in(0, 256), default=2, help="image loading threads (in-process)")
    r.add_argument(
        "--threads",
        type=_int_in(1, 1024),
        default=1,
        help="CPU threads per encode (default 1; the same count gives bit-identical latents)",
    )
    r.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data: a local instance (no ADDRESS), or join the cluster at ADDRESS",
    )
    r.add_argument("--workers", type=_int_in(1, 4096), default=1, help="Ray encode actors (default 1)")
    r.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per encode actor (default 1 where the cluster has GPUs, else CPU actors)",
    )
    r.add_argument("--ray-cpus", type=_int_in(1, 4096), default=None, help="CPUs of a local Ray instance")
    _common(cache)

    demo = sub.add_parser("demo", help="encode sample images, decode them back, save them with metadata")
    demo.add_argument("-o", "--output", default="outputs/demo", help="output folder (default outputs/demo)")
    demo.add_argument(
        "--family", default="sd1", choices=FAMILY_NAMES, help="family of the approximate VAE (default sd1)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    _verbose(demo)

    srv = sub.add_parser("serve", help="serve the Latent Batch app (web UI and HTTP API)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=_int_in(0, 65535), default=7860, help="port (default 7860)")
    srv.add_argument(
        "--vae",
        default="approx",
        metavar="approx|PATH",
        help="default VAE: 'approx' (built-in) or a file/folder",
    )
    srv.add_argument("--vae-dir", metavar="DIR", help="a folder of VAE files offered in the VAE list")
    srv.add_argument(
        "--family", choices=FAMILY_NAMES, help="model family of the built-in VAE (default: from the latents)"
    )
    srv.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    srv.add_argument(
        "-o",
        "--output-dir",
        default="outputs/latent-batch",
        help="where encoded latents and decoded images go (default outputs/latent-batch)",
    )
    srv.add_argument(
        "--hide-ui-dir-config",
        action="store_true",
        help="no server-side input folders in the UI (as the webui's flag of the same name)",
    )
    srv.add_argument(
        "--api-auth",
        metavar="USER:PASS[,USER:PASS]",
        help="require HTTP Basic credentials on the API routes (as the webui's --api-auth)",
    )
    srv.add_argument(
        "--api-max-mb", type=float, default=64, help="largest API request body in MiB (default 64)"
    )
    _verbose(srv)
    return parser


@contextmanager
def _interruptible() -> Iterator[list[bool]]:
    """First Ctrl-C: stop after the current chunk (finished samples are kept). Second: abort."""
    flag = [False]
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: object) -> None:
        if flag[0]:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag[0] = True
        sys.stderr.write(f"\n{PREFIX} interrupt: stopping after the current chunk (Ctrl-C again to abort)\n")

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _engine_options(args: argparse.Namespace):  # -> EngineOptions
    from lib_vaebatch.engine.options import EngineOptions

    chunk = args.chunk
    return EngineOptions(
        chunk_mode="per-sample" if chunk == "per-sample" else "auto",
        max_chunk=chunk if isinstance(chunk, int) else None,
        nan_check=not args.no_nan_check,
        ladder=tuple(s for s in args.ladder.replace(" ", "").split(",") if s),
        keep_recovered_dtype=args.keep_precision,
        tiling=args.tiling,
        tile_mode=args.tile_mode,
        tile_size=args.tile_size,
        spill=not args.no_spill,
    )


def _load_backend(args: argparse.Namespace, family: str | None = None):  # -> VAEBackend
    from lib_vaebatch.backends import load_vae
    from lib_vaebatch.devices import dtype_name, dtype_supported

    device, dtype = _device(args), _dtype(args)
    if dtype is not None and not dtype_supported(device, dtype):
        raise CliError(f"{dtype_name(dtype)} is not supported on {device} by this torch; use --dtype auto")
    try:
        backend = load_vae(args.vae, family=family or args.family, device=device, dtype=dtype)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from None
    except ImportError as exc:
        raise CliError(f"loading {args.vae} needs the diffusers package ({exc})") from None
    if dtype is not None:
        backend.set_dtype(dtype)
    return backend


def _check_folder(folder: Path, given: Path | None = None) -> None:
    """``folder`` is, or can be made, a folder (``given``: the argument it is for): a file on the way
    is a one-line error now, not an exception after the work is done."""
    given = given or folder
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise CliError(f"{given}: {'' if p == given else f'{p} '}exists and is not a folder")
            return


def _report_events(events: Sequence[str], verbose: bool) -> None:
    for e in events:
        (log.info if verbose else log.debug)(e)


def cmd_encode(args: argparse.Namespace) -> int:
    from lib_vaebatch.engine.encode import EncodeOptions
    from lib_vaebatch.images import ImageInputError, find_images, parse_color
    from lib_vaebatch.jobs import encode_to_files
    from lib_vaebatch.progress import ConsoleProgress

    try:
        parse_color(args.background)
        options = _engine_options(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    paths = find_images(args.images)
    if not paths:
        raise CliError("no images found in " + ", ".join(args.images))
    _check_folder(Path(args.output).parent, Path(args.output))
    backend = _load_backend(args)
    if backend.preview:
        log.info("using the built-in approximate VAE (%s): preview quality", backend.family.name)
    eo = EncodeOptions(
        fit=args.fit, alpha=args.alpha, background=args.background, sample=args.sample, seed=args.seed
    )
    bar = ConsoleProgress("encode", enabled=not args.no_progress)
    start = time.perf_counter()
    with _interruptible() as stop:
        try:
            job = encode_to_files(
                backend,
                paths,
                args.output,
                encode_options=eo,
                options=options,
                comfy=args.comfy,
                half=args.half,
                overwrite=args.overwrite,
                progress=bar,
                cancel=lambda: stop[0],
            )
        except ImageInputError as exc:
            raise CliError(str(exc)) from None
        except FileExistsError as exc:
            raise CliError(str(exc)) from None
        finally:
            bar.close()
    _report_events(job.result.events, args.verbose)
    done = sum(r.done for r in job.result.reports)
    for path in job.written:
        print(path)
    log.info(
        "encoded %d/%d images into %d file(s) in %.1f s (%s)",
        done,
        len(paths),
        len(job.written),
        time.perf_counter() - start,
        backend.display_name,
    )
    for rep in job.result.reports:
        if not rep.done:
            log.error("%s: %s: %s", paths[rep.index], rep.status.value, rep.message)
    if job.result.cancelled:
        return EXIT_INTERRUPTED
    return EXIT_OK if job.ok else EXIT_FAILED


def cmd_decode(args: argparse.Namespace) -> int:
    from lib_vaebatch.backends import APPROX, ApproxVAE
    from lib_vaebatch.jobs import decode_to_folder, load_latent_files
    from lib_vaebatch.progress import ConsoleProgress

    try:
        options = _engine_options(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    out = Path(args.output)
    _check_folder(out)
    approx = str(args.vae).strip().lower() == APPROX
    device, dtype = _device(args), _dtype(args)  # checked now: the built-in VAEs are made later
    backend = None if approx else _load_backend(args)
    batches, errors = load_latent_files(args.latents, None if backend is None else backend.latent_channels)
    if errors:
        for err in errors:
            print(f"{PREFIX} error: {err}", file=sys.stderr)
        return EXIT_INPUT
    cache: dict[str, object] = {}

    def backend_for(family):  # type: ignore[no-untyped-def]
        if backend is not None:
            return backend
        name = args.family or family.name
        if name not in cache:
            cache[name] = ApproxVAE(name, device=device, dtype=dtype or torch.float32)
        return cache[name]

    if approx:
        log.info("using the built-in approximate VAE: preview quality")
    bar = ConsoleProgress("decode", enabled=not args.no_progress)
    start = time.perf_counter()
    with _interruptible() as stop:
        try:
            job = decode_to_folder(
                batches,
                out,
                backend_for,
                options=options,
                pattern=args.pattern,
                fmt=args.format,
                quality=args.quality,
                progress=bar,
                cancel=lambda: stop[0],
            )
        finally:
            bar.close()
    for f in job.files:
        _report_events(f.result.events, args.verbose)
    total = sum(len(b) for b in batches)
    log.info(
        "decoded %d/%d samples from %d file(s) in %.1f s into %s",
        len(job.saved),
        total,
        len(batches),
        time.perf_counter() - start,
        out,
    )
    for path, rep in job.failures:
        if rep.status.value == "failed":
            log.error("%s: sample %d failed: %s", path, rep.index, rep.message)
    for err in job.save_errors:
        log.error(err)
    if job.cancelled:
        log.warning("interrupted: %d sample(s) not decoded", total - len(job.saved))
        return EXIT_INTERRUPTED
    return EXIT_OK if job.ok else EXIT_FAILED


def cmd_cache(args: argparse.Namespace) -> int:
    from lib_vaebatch.cache.buckets import BucketError, BucketSpec
    from lib_vaebatch.cache.on_ray import RayUnavailableError  # imports no ray itself
    from lib_vaebatch.cache.run import run_cache
    from lib_vaebatch.cache.settings import CacheConflictError, CacheSettings
    from lib_vaebatch.cache.shards import cache_engine_options, vae_identity
    from lib_vaebatch.cache.sources import SourceError
    from lib_vaebatch.images import parse_color
    from lib_vaebatch.progress import ConsoleProgress

    try:
        parse_color(args.background)
        options = _engine_options(args)
        spec = BucketSpec(
            args.resolution,
            args.bucket_reso_steps,
            args.min_bucket_reso,
            args.max_bucket_reso,
            args.no_upscale,
        )
    except (ValueError, BucketError) as exc:
        raise CliError(str(exc)) from None
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise CliError("--gpus-per-worker must not be negative")
    out = Path(args.output)
    _check_folder(out)
    if args.ray is not None and args.device not in ("auto", "cpu"):
        raise CliError("--device is chosen by Ray for its workers (see --gpus-per-worker)")
    if args.ray is not None:
        args.device = "cpu"  # the driver loads the VAE only to know it; the actors encode
    backend = _load_backend(args)
    try:
        settings = CacheSettings(
            vae=vae_identity(backend),
            buckets=spec,
            format=args.format,
            flip=args.flip,
            alpha=args.alpha,
            background=args.background,
            sample=args.sample,
            seed=args.seed,
            storage="fp16" if args.half else "bf16" if args.bf16 else "fp32",
            shard_size=args.shard_size,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    ray = None
    if args.ray is not None:
        ray = {
            "vae": args.vae, "family": args.family, "dtype": None if args.dtype == "auto" else args.dtype,
            "address": args.ray or None, "workers": args.workers, "gpus_per_worker": args.gpus_per_worker,
            "num_cpus": args.ray_cpus,
            "options": cache_engine_options(options, args.batch_size),
        }  # fmt: skip
    bar = ConsoleProgress("cache", enabled=not args.no_progress)
    start = time.perf_counter()
    with _interruptible() as stop:
        try:
            run = run_cache(
                args.sources, out, settings, backend=None if ray else backend, options=options,
                batch_size=args.batch_size, overwrite=args.overwrite, loaders=args.loaders,
                threads=args.threads, ray=ray, progress=bar, cancel=lambda: stop[0],
            )  # fmt: skip
        except (SourceError, CacheConflictError, RayUnavailableError) as exc:
            raise CliError(str(exc)) from None
        finally:
            bar.close()
    elapsed = time.perf_counter() - start
    failed = run.failed
    rate = f", {run.encoded / elapsed:.1f} images/s" if run.encoded and elapsed > 0 else ""
    log.info(
        "cache %s: %d images: %d ok, %d recovered, %d failed; %d processed in %d shard(s), %d already done "
        "(%d shard(s) skipped) in %.1f s%s%s",
        out, run.total, run.count("ok"), run.count("recovered"), len(failed), run.encoded,
        run.shards_written, run.skipped, run.shards_skipped, elapsed, rate, " on Ray" if ray else "",
    )  # fmt: skip
    for rec in failed[:20]:
        log.error("%s: %s", rec["source"], rec["error"])
    if len(failed) > 20:
        log.error("... and %d more (see %s)", len(failed) - 20, out / "index.jsonl")
    if run.cancelled:
        log.warning("interrupted: rerun the same command to finish")
        return EXIT_INTERRUPTED
    if failed:
        log.error("%d image(s) failed (status 'failed' in %s)", len(failed), out / "index.jsonl")
        return EXIT_FAILED
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from lib_vaebatch.ui.serve import serve
        from lib_vaebatch.ui.standalone import StandaloneHost
    except ImportError as exc:
        raise CliError(
            f"serve needs gradio and fastapi ({exc}); pip install 'sd-webui-vae-batch[ui]'"
        ) from None
    if args.vae_dir and not Path(args.vae_dir).is_dir():
        raise CliError(f"--vae-dir {args.vae_dir}: not a folder")
    if args.api_max_mb <= 0:
        raise CliError("--api-max-mb must be positive")
    _check_folder(Path(args.output_dir))
    host = StandaloneHost(
        args.vae,
        args.vae_dir,
        args.output_dir,
        device=_device(args),
        family=args.family,
        hide_dirs=args.hide_ui_dir_config,
    )
    try:  # the default VAE is loaded now: a bad --vae is an error before the server starts
        host.backend(host.default_vae())
    except ValueError as exc:
        raise CliError(str(exc)) from None
    serve(host, args.host, args.port, api_auth=args.api_auth, max_bytes=int(args.api_max_mb * (1 << 20)))
    return EXIT_OK


def _device(args: argparse.Namespace) -> torch.device:
    from lib_vaebatch.devices import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    from lib_vaebatch.devices import parse_dtype

    try:
        return None if args.dtype == "auto" else parse_dtype(args.dtype)
    except ValueError as exc:
        raise CliError(f"--dtype: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command == "encode":
            return cmd_encode(args)
        if args.command == "decode":
            return cmd_decode(args)
        if args.command == "cache":
            return cmd_cache(args)
        if args.command == "serve":
            return cmd_serve(args)
        from lib_vaebatch.demo import run_demo

        _check_folder(Path(args.output))
        return run_demo(Path(args.output), family=args.family, progress=not args.no_progress)
    except CliError as exc:
        print(f"{PREFIX} error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"{PREFIX} aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line (and its traceback with -v), never a bare traceback
        log.debug("the traceback of the unexpected error:", exc_info=True)  # shown with -v
        text = " ".join(str(exc).split()) or "(no message)"
        print(f"{PREFIX} error: unexpected {type(exc).__name__}: {text}", file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
