"""The pattern engine against the webui's documented tokens and sanitisation (A1111 1.10.1,
``modules/images.py`` ``FilenameGenerator`` / ``sanitize_filename_part``). Each expected value is
worked out by hand from the webui's rules, noted beside it."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from PIL import Image

from lib_vaebatch.naming import SKIP_PREVIOUS, apply_pattern, sanitize_part, standard_tokens

NOW = dt.datetime(2024, 5, 6, 7, 8, 9)
PROMPT = "a red fox, forest"
BASE = {
    "prompt": PROMPT,
    "negative_prompt": "blurry",
    "seed": 1234,
    "steps": 20,
    "cfg": 7.0,
    "width": 512,
    "height": 768,
    "sampler": "DPM++ 2M",
    "scheduler": "Karras",
    "model_name": "sd_xl_base_1.0",
    "model_hash": "31e35c80fc",
    "job_timestamp": "20240506070000",
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def name(pattern: str, **values: object) -> str:
    return apply_pattern(pattern, standard_tokens({**BASE, **values}, now=NOW))


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("[seed]", "1234"),
        ("[steps]-[cfg]", "20-7.0"),  # str() of the float, as the webui's str(p.cfg_scale)
        ("[width]x[height]", "512x768"),
        ("[sampler]", "DPM++ 2M"),
        ("[model_name]-[model_hash]", "sd_xl_base_1.0-31e35c80fc"),
        ("[date]", "2024-05-06"),
        ("[datetime]", "20240506070809"),  # default %Y%m%d%H%M%S
        ("[datetime<%Y-%m-%d %H:%M>]", "2024-05-06 07_08"),  # ':' sanitised, spaces kept
        ("[datetime<>]", "20240506070809"),  # an empty format is the default one
        ("[job_timestamp]", "20240506070000"),
        ("[prompt]", "a_red_fox,_forest"),  # spaces become '_' in [prompt] only
        ("[prompt_spaces]", "a red fox, forest"),
        ("[prompt_no_styles]", "a red fox, forest"),  # no styles: the prompt with spaces kept
        ("[prompt_words]", "a red fox forest"),  # split on whitespace and punctuation
        ("[prompt_hash]", sha(PROMPT)[:8]),  # sha256, 8 characters by default
        ("[prompt_hash<12>]", sha(PROMPT)[:12]),
        ("[prompt_hash<>]", sha(PROMPT)[:8]),
        ("[negative_prompt_hash]", sha("blurry")[:8]),
        ("[full_prompt_hash<10>]", sha(f"{PROMPT} blurry")[:10]),  # prompt, space, negative
        ("[basename]", "img"),  # no basename: 'img'
        ("[none]", ""),
        ("[SEED]-[Prompt_Spaces]", "1234-a red fox, forest"),  # names are case-insensitive
        ("[seed]_[seed]", "1234_1234"),
    ],
)
def test_documented_tokens(pattern, expected):
    assert name(pattern) == expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("[nope]", "[nope]"),  # unknown: left literally
        ("[Nope<1><2>]", "[Nope]"),  # ... with its case kept and its arguments dropped
        ("[seed<3>]", "[seed]"),  # an argument-less token given arguments fails: literal
        ("[prompt_hash<x>]", "[prompt_hash]"),  # int('x') fails: literal
        ("[user]", "[user]"),  # no value: literal
        ("[clip_skip]-[seed]", "[clip_skip]-1234"),
        ("[datetime<%Y<%m>]", "[datetime_%Y]"),  # only a trailing <...> is an argument (and "<" is sanitised)
        ("[<x>]", "[]"),  # an empty name is unknown too
        ("[[seed]]", "[1234]"),  # the innermost [..] is the token
        ("[seed", "[seed"),  # unclosed: plain text
        ("[]", "[]"),
    ],
)
def test_unresolved_tokens_stay_literal(pattern, expected):
    assert name(pattern) == expected


def test_skip_previous_drops_the_text_since_the_last_token():
    # [denoising] without denoising: NOTHING_AND_SKIP_PREVIOUS_TEXT
    assert name("[seed]-x-[denoising]-y") == "1234-y"
    assert name("[seed]-[denoising]", denoising=0.5) == "1234-0.5"
    assert name("[seed]-[denoising]", denoising="0.0") == "1234"  # 0 is no denoising
    assert apply_pattern("a-[skip]b", {"skip": SKIP_PREVIOUS}) == "b"


def test_seed_and_batch_tokens():
    single = {"batch_size": 1, "batch_index": 0, "n_iter": 1, "iteration": 0, "all_seeds": [1234]}
    assert name("[seed_first]", **single) == "1234"  # batch of one: the seed
    assert name("a-[seed_last]", **single) == ""  # batch of one: skipped with its text
    assert name("a-[batch_number]", **single) == ""
    assert name("a-[generation_number]", **single) == ""
    batch = {"batch_size": 4, "batch_index": 2, "n_iter": 3, "iteration": 1, "all_seeds": [10, 11, 12, 13]}
    assert name("[seed_first]-[seed_last]", **batch) == "10-13"
    assert name("[batch_number]", **batch) == "3"  # batch_index + 1
    assert name("[generation_number]", **batch) == "7"  # iteration * batch_size + batch_index + 1
    assert name("[batch_size]", **batch) == "4"
    assert name("[seed_first]-[batch_number]") == "[seed_first]-[batch_number]"  # no batch data


def test_seed_without_a_seed_is_empty():
    assert name("x[seed]y", seed=None) == "xy"


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected"),
    [
        ("DPM++ 2M", "Karras", "Karras"),
        ("DPM++ 2M", "Automatic", "Karras"),  # the sampler's default scheduler
        ("DPM++ 2M SDE", "Automatic", "Exponential"),
        ("Euler a", "Automatic", "Automatic"),  # no default: stays Automatic
        ("Euler", "SGM Uniform", "Sgm uniform"),  # str.capitalize(), as the webui
        ("Some Extension Sampler", "Automatic", "[scheduler]"),  # unknown sampler: fails, literal
    ],
)
def test_scheduler(sampler, scheduler, expected):
    assert name("[scheduler]", sampler=sampler, scheduler=scheduler) == expected


def test_sampler_scheduler():
    assert name("[sampler_scheduler]", sampler="Euler", scheduler="SGM Uniform") == "Euler Sgm uniform"
    assert name("x-[scheduler]", scheduler=None) == ""  # p without a scheduler: skipped


def test_prompt_words():
    words = "one two three four five six seven eight nine ten"
    assert name("[prompt_words]", prompt=words) == "one two three four five six seven eight"
    assert name("[prompt_words]", prompt=words, max_prompt_words=3) == "one two three"
    assert name("[prompt_words]", prompt="(masterpiece:1.2), best_quality") == "masterpiece 1 2 best quality"
    assert name("[prompt_words]", prompt="夕暮れ の 猫") == "夕暮れ の 猫"
    assert name("[prompt_words]", prompt="") == "empty"
    assert name("[prompt_words]", prompt=None) == "empty"


def test_empty_and_missing_prompt():
    assert name("x[prompt]y", prompt="") == "xy"
    assert name("[prompt]-[prompt_hash]", prompt=None) == "[prompt]-[prompt_hash]"


def test_hasprompt():
    p = "a red Fox in the snow"
    # found: the expected text, lower-cased; missing: the default after '|', or nothing
    assert name("[hasprompt<FOX>]", prompt=p) == "fox"
    assert name("[hasprompt<fox|animal><car><dog|no dog>]", prompt=p) == "foxno_dog"  # spaces -> '_'
    assert name("[hasprompt<car|a|b>]", prompt=p) == "a"
    assert name("[hasprompt<>]", prompt=p) == ""


def test_styles_vae_and_image_hash():
    assert name("[styles]", styles=[]) == "None"
    assert name("[styles]", styles=["None", "cinematic", "a/b"]) == "cinematic, a_b"
    assert name("[vae_filename]", vae_filename="sdxl.vae.safetensors") == "sdxl"  # up to the first '.'
    assert name("[vae_filename]", vae_filename="/models/VAE/.hidden.pt") == "hidden"
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    full = hashlib.sha256(image.tobytes()).hexdigest()
    assert name("[image_hash]", image=image) == full  # full length by default
    assert name("[image_hash<10>]", image=image) == full[:10]
    assert name("[image_hash]") == "[image_hash]"


def test_datetime_time_zones():
    utc = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
    tokens = standard_tokens(BASE, now=utc)
    assert apply_pattern("[datetime<%H%M><Asia/Tokyo>]", tokens) == "1608"
    assert apply_pattern("[datetime<%H%M><asia/tokyo>]", tokens) == "1608"  # any case, as pytz
    local = utc.astimezone().strftime("%H%M")
    assert apply_pattern("[datetime<%H%M><Nowhere/City>]", tokens) == local  # unknown: local time
    assert apply_pattern("[datetime<%H%M><../../etc/passwd>]", tokens) == local


@pytest.mark.parametrize(
    ("text", "replace_spaces", "expected"),
    [
        ('a#b<c>d:e"f/g\\h|i?j*k', False, "a_b_c_d_e_f_g_h_i_j_k"),  # the webui's invalid characters
        ("line\nbreak\r\ttab", False, "line_break__tab"),
        ("  lead and trail . . ", False, "lead and trail"),  # lstrip ' ', rstrip ' .'
        ("\tx", False, "_x"),  # tab is replaced before stripping, so it stays
        ("a b c", True, "a_b_c"),
        ("...", False, ""),
        ("x" * 127 + ". y", False, "x" * 127),  # cut to 128, then the trailing '.' goes
        ("é" * 200, False, "é" * 128),  # characters, not bytes
    ],
)
def test_sanitize_part_matches_the_webui(text, replace_spaces, expected):
    assert sanitize_part(text, replace_spaces=replace_spaces) == expected


def test_long_values_are_cut_per_part():
    assert name("[prompt_spaces]", prompt="w" * 300) == "w" * 128
    assert name("[prompt_spaces]-[prompt_spaces]", prompt="w" * 300) == "w" * 128 + "-" + "w" * 128


def test_our_deliberate_differences():
    # The pattern's own text is sanitised too: '/' makes no sub-folder.
    assert name("[date]/[seed]") == "2024-05-06_1234"
    assert name("a\nb-[seed]") == "a_b-1234"  # the webui would drop "a\n"
    assert name("  [seed] .") == "1234"  # the whole name is stripped like a part
    assert name("[seed]-[prompt_spaces]", prompt="bell\x07 esc\x1b del\x7f") == "1234-bell_ esc_ del_"
