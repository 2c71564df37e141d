from __future__ import annotations

import datetime as dt
import os

from hypothesis import given
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
