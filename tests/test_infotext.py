from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lib_vaebatch import infotext


def test_parse_webui_style_infotext():
    text = (
        "a cat, sitting\nNegative prompt: blurry\n"
        'Steps: 20, Sampler: Euler a, Seed: 42, Size: 512x512, Lora hashes: "a: 1, b: 2"'
    )
    info = infotext.parse(text)
    assert info.prompt == "a cat, sitting" and info.negative_prompt == "blurry"
    assert info.params["Seed"] == "42" and info.params["Lora hashes"] == "a: 1, b: 2"


def test_a_last_line_with_fewer_than_three_pairs_is_prompt_text():
    info = infotext.parse("hello\nSteps: 20, Seed: 1")
    assert info.params == {} and info.prompt == "hello\nSteps: 20, Seed: 1"


def test_with_params_adds_and_replaces_keys():
    base = "a dog\nSteps: 20, Seed: 1, Size: 64x64"
    out = infotext.with_params(base, {"VAE Batch": "recovered bf16, tiled", "Seed": 2})
    parsed = infotext.parse(out)
    assert parsed.prompt == "a dog"
    assert parsed.params == {
        "Steps": "20",
        "Seed": "2",
        "Size": "64x64",
        "VAE Batch": "recovered bf16, tiled",
    }
    assert '"recovered bf16, tiled"' in out


_key = st.from_regex(r"[A-Za-z][A-Za-z0-9 ]{0,10}[A-Za-z0-9]", fullmatch=True)
_value = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters='\r\x85\u2028\u2029"\\'),
    min_size=1,
    max_size=20,
).filter(lambda s: s.strip() == s and s)


@given(st.dictionaries(_key, _value, min_size=3, max_size=6), st.text(alphabet="abc ,", max_size=20))
def test_params_round_trip(params, prompt):
    text = infotext.Infotext(prompt.strip(), "", params).text()
    assert infotext.parse(text).params == params
