"""Every CLI subcommand (enumerated from the argparse parser, so a new one is covered as soon as it
takes a file argument) driven through the bad-input corpus and bad option values.

Each bad file goes into every argument of its kind: latents files, images, the VAE, the VAE folder
and the output. The answer must be exit status 2 before anything runs, one error line naming the
file (or the option), no traceback and nothing written. An unexpected exception is one line and
status 3 (:data:`~lib_vaebatch.cli.EXIT_UNEXPECTED`)."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_vaebatch import cli
from tests.hardening.test_bad_inputs import (
    FILE_CASES,
    GOOD_LATENTS,
    IMAGE_CASES,
    NO_FAMILY_CHANNELS,
    Evil,
    image_bytes,
    no_family,
)

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = {cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_INPUT, cli.EXIT_UNEXPECTED, cli.EXIT_INTERRUPTED}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# -- the corpus, by the kind of argument a file goes into -------------------------------------------
@dataclass
class Bad:
    id: str
    name: str  # the file's name (inside the case folder)
    make: Callable[[Path], None]  # writes it (or leaves it missing)


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def _folder(p: Path) -> None:
    p.mkdir()


def _missing(p: Path) -> None:
    pass


LATENTS = [
    Bad(c.id, f"bad{c.suffix}", lambda p, c=c: p.write_bytes(c.make(p.with_name("pwned"))))
    for c in FILE_CASES
]
IMAGES = [
    Bad(c.id, "bad.png", lambda p, c=c: p.write_bytes(c.images()[0]))
    for c in IMAGE_CASES
    if c.problem is not None and not c.request and len(c.images()) == 1
] + [Bad("missing-image", "gone.png", _missing), Bad("text-file-as-image", "notes.txt", _bytes(b"hello"))]
VAES = [
    Bad("missing-vae", "gone.safetensors", _missing),
    Bad("corrupt-vae", "vae.safetensors", _bytes(b"\x10\0\0\0\0\0\0\0{not json at all")),
    Bad("latents-as-vae", "vae.safetensors", _bytes(GOOD_LATENTS)),
    Bad("pickle-vae", "vae.ckpt", _bytes(pickle.dumps(Evil("true")))),
    Bad("empty-folder-as-vae", "vae", _folder),
]
FOLDERS = [Bad("file-as-folder", "vaes.txt", _bytes(b"x")), Bad("missing-folder", "gone", _missing)]
UNDER_A_FILE = Bad("output-under-a-file", "taken.png/out.safetensors", lambda p: p.parent.write_bytes(b"x"))
OUTPUT_FOLDERS = [Bad("output-is-a-file", "taken.png", _bytes(b"x")), UNDER_A_FILE]
OUTPUT_FILES = [Bad("output-is-a-folder", "taken.safetensors", _folder), UNDER_A_FILE]
#: argument dest -> the bad files that go into it; any other positional argument gets them all.
CORPUS: dict[str, list[Bad]] = {
    "latents": LATENTS,
    "images": IMAGES,
    "sources": IMAGES + VAES,  # cache's SRC: images, folders of them, lists; a VAE file is none of those
    "vae": VAES,
    "vae_dir": FOLDERS,
    "output": OUTPUT_FOLDERS,
    "output_dir": OUTPUT_FOLDERS,
}


def _corpus(action: argparse.Action) -> list[Bad]:
    if action.dest == "output" and _is_file_output(action):
        return OUTPUT_FILES
    return CORPUS.get(action.dest, LATENTS + IMAGES + VAES)


def _is_file_output(action: argparse.Action) -> bool:
    return bool(action.metavar and str(action.metavar).endswith(".safetensors"))


def _good(action: argparse.Action, root: Path) -> Path:
    """A good value for a required argument: a real input file, or an output that does not exist."""
    if action.dest == "images":
        path = root / "good.png"
        path.write_bytes(image_bytes((64, 64)))
        return path
    if action.dest == "latents":
        path = root / "good.safetensors"
        path.write_bytes(GOOD_LATENTS)
        return path
    return root / ("result.safetensors" if _is_file_output(action) else "result")


def _file_args(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.dest in CORPUS or (not a.option_strings and a.dest != "help")]


def _argv(
    command: str, parser: argparse.ArgumentParser, root: Path, bad: tuple[str, Path] | None
) -> list[str]:
    """The command with good values for its required arguments and ``bad`` in its place."""
    argv = [command]
    for action in parser._actions:
        value: Path | None = None
        if bad is not None and action.dest == bad[0]:
            value = bad[1]
        elif action.required or (not action.option_strings and action.dest != "help"):
            value = _good(action, root)
        if value is None:
            continue
        argv += [str(value)] if not action.option_strings else [action.option_strings[-1], str(value)]
    flags = {s for a in parser._actions for s in a.option_strings}
    argv += ["--no-progress"] if "--no-progress" in flags else []
    return argv + (["--device", "cpu"] if "--device" in flags else [])


def _cases() -> Iterator[tuple[str, str, Bad]]:
    for command, parser in subcommands().items():
        for action in _file_args(parser):
            for bad in _corpus(action):
                yield command, action.dest, bad


CASES = list(_cases())


@pytest.fixture
def main(capsys, monkeypatch) -> Callable[[list[str]], tuple[int, str]]:
    """``cli.main`` in this process: (exit status, stderr). ``serve`` records instead of serving."""
    served: list[object] = []
    monkeypatch.setattr("lib_vaebatch.ui.serve.serve", lambda *a, **k: served.append(a))
    logger = logging.getLogger("vaebatch")

    def drop_handler() -> None:  # the console handler holds the stream of the run that made it
        for h in [h for h in logger.handlers if getattr(h, "_vaebatch", False)]:
            logger.removeHandler(h)

    def run(argv: list[str]) -> tuple[int, str]:
        drop_handler()
        capsys.readouterr()
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse
            status = exc.code if isinstance(exc.code, int) else 2
        finally:
            drop_handler()
        err = capsys.readouterr().err
        assert not served, f"{argv}: served despite bad input"
        return status, err

    return run


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, err
    return lines[0]


def _written(root: Path, before: set[Path]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p not in before and p.name != "pwned")


def test_every_subcommand_takes_some_file_argument():
    commands = subcommands()
    assert set(commands) >= {"encode", "decode", "demo", "serve"}
    assert {c: [a.dest for a in _file_args(p)] for c, p in commands.items() if not _file_args(p)} == {}
    assert {c for c, _dest, _bad in CASES} == set(commands)


@pytest.mark.parametrize(("command", "dest", "bad"), CASES, ids=[f"{c}-{d}-{b.id}" for c, d, b in CASES])
def test_bad_files_are_one_line_and_exit_2(tmp_path: Path, main, command: str, dest: str, bad: Bad) -> None:
    (tmp_path / "case").mkdir()
    path = tmp_path / "case" / bad.name
    bad.make(path)
    argv = _argv(command, subcommands()[command], tmp_path, (dest, path))
    before = set(tmp_path.rglob("*"))
    status, err = main(argv)
    assert status == cli.EXIT_INPUT, err
    line = _one_error_line(err)
    assert str(path) in line or (dest == "vae_dir" and path.name in line), line
    assert _written(tmp_path, before) == []
    assert not (tmp_path / "case" / "pwned").exists()


@pytest.mark.parametrize("channels", NO_FAMILY_CHANNELS)
def test_a_file_no_family_fits_beside_good_ones_stops_decode_before_anything_runs(
    tmp_path: Path, main, channels
):
    good = tmp_path / "good.safetensors"
    good.write_bytes(GOOD_LATENTS)
    bad = tmp_path / "odd.safetensors"
    save_file({"latents": torch.full((1, channels, 8, 8), 0.1)}, str(bad))
    status, err = main(
        ["decode", str(good), str(bad), str(good), "-o", str(tmp_path / "out"), "--no-progress"]
    )
    assert status == cli.EXIT_INPUT
    line = _one_error_line(err)
    assert line.startswith(f"[VAE Batch] error: {bad}: ") and re.search(no_family(channels), line)
    assert not (tmp_path / "out").exists()


# -- option values ------------------------------------------------------------------------------------
#: values that pass argparse but not the command: option -> a bad value
SEMANTIC = {
    "--device": "nodevice9",
    "--dtype": "fp7",
    "--ladder": "fp7",
    "--background": "not-a-colour",
    "--api-max-mb": "-1",
}


def _option_cases() -> Iterator[tuple[str, str, str]]:
    for command, parser in subcommands().items():
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.dest in CORPUS:
                continue
            option = action.option_strings[-1]
            if action.choices is not None or action.type is not None:  # argparse refuses it
                yield command, option, "zz-not-a-value"
            if option in SEMANTIC:
                yield command, option, SEMANTIC[option]


OPTION_CASES = list(_option_cases())


def test_the_option_cases_cover_every_subcommand():
    assert {c for c, _o, _v in OPTION_CASES} == set(subcommands())


@pytest.mark.parametrize(
    ("command", "option", "value"), OPTION_CASES, ids=[f"{c}{o}={v}" for c, o, v in OPTION_CASES]
)
def test_bad_option_values_are_one_line_and_exit_2(
    tmp_path: Path, main, command: str, option: str, value: str
):
    argv = _argv(command, subcommands()[command], tmp_path, None)
    before = set(tmp_path.rglob("*"))
    status, err = main([*argv, option, value])  # the last value of an option wins
    assert status == cli.EXIT_INPUT, err
    line = _one_error_line(err)
    assert option in line or value in line, line
    assert _written(tmp_path, before) == []


# -- the guard --------------------------------------------------------------------------------------
def test_an_unexpected_exception_is_one_line_with_its_type_and_exit_3(tmp_path: Path, main, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("something deep broke\nsecond line")

    monkeypatch.setattr("lib_vaebatch.jobs.decode_to_folder", broken)
    good = tmp_path / "good.safetensors"
    good.write_bytes(GOOD_LATENTS)
    status, err = main(["decode", str(good), "-o", str(tmp_path / "out"), "--no-progress"])
    assert status == cli.EXIT_UNEXPECTED == 3
    assert (
        _one_error_line(err) == "[VAE Batch] error: unexpected RuntimeError: something deep broke second line"
    )
    status, err = main(["-v", "decode", str(good), "-o", str(tmp_path / "out"), "--no-progress"])
    assert status == 3 and "Traceback" in err and "RuntimeError: something deep broke" in err  # -v shows it


def test_the_exit_statuses_are_documented():
    help_text = cli.build_parser().format_help()
    readme = (ROOT / "README.md").read_text()
    for status in sorted(DOCUMENTED):
        assert f"\n  {status} " in help_text, help_text
        assert f"status {status}" in " ".join(readme.split()), status


# -- the real process: no traceback reaches the terminal ------------------------------------------------
REAL_PROCESS_CASES = {"6-channels-no-family-has", "zero-byte-image", "missing-vae", "output-is-a-file"}


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_the_real_process_prints_one_line(tmp_path: Path, command: str):
    parser = subcommands()[command]
    action = _file_args(parser)[0]
    dest, pool = action.dest, _corpus(action)
    bad = next((b for b in pool if b.id in REAL_PROCESS_CASES), pool[0])
    (tmp_path / "case").mkdir()
    path = tmp_path / "case" / bad.name
    bad.make(path)
    proc = subprocess.run(
        [sys.executable, "-m", "lib_vaebatch", *_argv(command, parser, tmp_path, (dest, path))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == cli.EXIT_INPUT, proc.stderr
    assert str(path) in _one_error_line(proc.stderr)
