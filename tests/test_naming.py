from __future__ import annotations

import datetime as dt
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_vaebatch.naming import (
    SKIP_PREVIOUS,
    SequentialNamer,
    apply_pattern,
    next_sequence_number,
    sanitize_part,
    standard_tokens,
)


def test_tokens_resolve_and_unknown_ones_stay_literal():
    now = dt.datetime(2024, 5, 6, 7, 8, 9)
    tokens = standard_tokens({"prompt": "a red fox, forest", "seed": 42, "width": 512}, now=now)
    assert apply_pattern("[seed]-[prompt_words]", tokens) == "42-a red fox forest"
    assert apply_pattern("[date]_[datetime<%H%M>]", tokens) == "2024-05-06_0708"
    assert apply_pattern("[steps]-[nope]", tokens) == "[steps]-[nope]"
    assert len(apply_pattern("[prompt_hash<12>]", tokens)) == 12
    assert apply_pattern("x-[skip]", {"skip": SKIP_PREVIOUS}) == ""


def test_values_cannot_leave_the_folder():
    tokens = standard_tokens({"prompt": "../../etc/passwd\n", "seed": "a/b\\c"})
    name = apply_pattern("[prompt]/[seed]", tokens)
    assert "/" not in name and "\\" not in name and "\n" not in name


@given(st.text(max_size=300))
def test_sanitized_parts_are_safe(text):
    part = sanitize_part(text)
    assert not any(c in part for c in '/\\\n\r\t\x00:*?"<>|')
    assert len(part) <= 128
    assert part not in (".", "..")


@given(st.text(max_size=80), st.text(max_size=80))
def test_patterns_never_produce_separators(pattern, prompt):
    name = apply_pattern(pattern, standard_tokens({"prompt": prompt}))
    assert "/" not in name and "\\" not in name and "\x00" not in name


def test_sequence_numbers_continue_and_never_overwrite(tmp_path):
    (tmp_path / "00007-old.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    assert next_sequence_number(tmp_path) == 8
    namer = SequentialNamer(tmp_path)
    (tmp_path / "00008-a.png").write_bytes(b"taken")  # appears after the scan
    with namer.create("a", ".png") as (path, fh):
        fh.write(b"new")
    assert path.name == "00009-a.png" and (tmp_path / "00008-a.png").read_bytes() == b"taken"
    with namer.create("a", ".png") as (path2, fh):
        fh.write(b"b")
    assert path2.name == "00010-a.png"


def test_failed_write_leaves_no_partial_file(tmp_path):
    namer = SequentialNamer(tmp_path)
    try:
        with namer.create("x", ".png") as (_path, fh):
            fh.write(b"half")
            raise OSError("disk full")
    except OSError:
        pass
    assert os.listdir(tmp_path) == []


def test_over_long_names_are_cut_to_the_file_system_limit(tmp_path):
    with SequentialNamer(tmp_path).create("é" * 400, ".png") as (path, fh):
        fh.write(b"x")
    assert len(path.name.encode()) <= 255 and path.exists()


def test_sequence_numbers_are_read_as_the_webui_reads_them(tmp_path):
    for existing in ("00003.png", "00002-x.png", "notes.txt", "12a-x.png", "img-0040-x.png"):
        (tmp_path / existing).write_bytes(b"x")
    assert next_sequence_number(tmp_path) == 4  # "00003.png" counts too, "12a" does not
    assert next_sequence_number(tmp_path, basename="img") == 41
    assert next_sequence_number(tmp_path / "missing") == 0


HOSTILE = [
    "../../../etc/passwd",
    "/absolute/path",
    "..\\..\\windows\\system32",
    "..",
    ".",
    "CON",
    "NUL.txt",
    "com1",
    "a\x00b\x01c\x1b[31m\x7f",
    "\ud800 lone surrogate",
    "trailing dots and spaces. . .",
    "x" * 5000,
    "狐" * 400,
    "🦊" * 300,
]


@pytest.mark.parametrize("prompt", HOSTILE)
@pytest.mark.parametrize(
    "pattern", ["[prompt]", "[prompt_spaces]-[seed]", "../[prompt_words]/..", "[prompt]\\.."]
)
def test_hostile_prompts_and_patterns_stay_in_the_folder(tmp_path, prompt, pattern):
    out = tmp_path / "out"
    deco = apply_pattern(pattern, standard_tokens({"prompt": prompt, "seed": 1}))
    assert not any(c in deco for c in "/\\\x00\n") and deco not in (".", "..")
    with SequentialNamer(out).create(deco, ".png") as (path, fh):
        fh.write(b"x")
    assert path.parent == out and path.name[:5].isdigit() and len(path.name.encode()) <= 255
    assert os.listdir(out) == [path.name] and sorted(os.listdir(tmp_path)) == ["out"]


_TOKEN_NAMES = ["seed", "prompt", "PROMPT_spaces", "prompt_words", "datetime", "hasprompt", "denoising",
                "prompt_hash", "image_hash", "scheduler", "batch_number", "nope", ""]  # fmt: skip
_ARG = st.text(alphabet=st.characters(blacklist_characters="<>[]"), max_size=12)
_TOKENS = st.builds(
    lambda n, args: f"[{n}{''.join(f'<{a}>' for a in args)}]",
    st.sampled_from(_TOKEN_NAMES),
    st.lists(_ARG, max_size=3),
)
_PATTERNS = st.lists(st.one_of(st.text(max_size=10), _TOKENS), max_size=8).map("".join)
_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "prompt": st.text(max_size=200),
        "negative_prompt": st.text(max_size=50),
        "seed": st.one_of(st.integers(), st.text(max_size=20)),
        "sampler": st.text(max_size=20),
        "scheduler": st.sampled_from(["Automatic", "Karras", "x/y"]),
        "denoising": st.one_of(st.floats(allow_nan=True), st.text(max_size=5)),
        "batch_size": st.integers(0, 4),
        "batch_index": st.integers(0, 3),
        "styles": st.lists(st.text(max_size=10), max_size=3),
        "vae_filename": st.text(max_size=30),
        "user": st.text(max_size=30),
    },
)


@given(_PATTERNS, _VALUES)
def test_the_pattern_engine_never_raises_or_makes_a_path(pattern, values):
    deco = apply_pattern(pattern, standard_tokens(values))
    assert not any(c in deco for c in '/\\:*?"<>|#') and deco not in (".", "..")
    assert all(ord(c) >= 32 and ord(c) != 127 and not 0xD800 <= ord(c) < 0xE000 for c in deco)
    assert deco == deco.lstrip(" ").rstrip(" .")


@settings(max_examples=40, deadline=None)
@given(_PATTERNS, st.text(max_size=300))
def test_any_pattern_and_prompt_make_one_file_in_the_folder(pattern, prompt):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        deco = apply_pattern(pattern, standard_tokens({"prompt": prompt}))
        with SequentialNamer(root / "o").create(deco, ".png") as (path, fh):
            fh.write(b"x")
        assert (
            path.parent == root / "o" and os.listdir(root) == ["o"] and os.listdir(root / "o") == [path.name]
        )
