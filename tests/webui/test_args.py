"""The argument model: one source for API order, element ids, settings keys, infotext labels,
hover help and the README's API table."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_vaebatch.webui import args as A

ROOT = Path(__file__).resolve().parents[2]


def test_readme_api_table_is_the_models():
    assert A.api_doc() in (ROOT / "README.md").read_text()


def test_every_argument_has_help_and_a_unique_key():
    assert A.ARGS[0].name == "enabled"
    assert len({a.setting_key for a in A.ARGS + A.EXTRA_SETTINGS}) == len(A.ARGS) + len(A.EXTRA_SETTINGS)
    assert set(A.help_table()) == {a.name for a in A.ARGS}
    assert all(len(text) > 30 for text in A.help_table().values())
    labels = [a.infotext for a in A.ARGS if a.infotext]
    assert len(set(labels)) == len(labels) and all(label.startswith("VAE Batch ") for label in labels)


def test_positional_values_are_checked_and_typed():
    values = A.from_positional([True, "4", "false", "BF16", 1, "device", "Always", "fast", 16.0])
    assert values == {**A.defaults(), "enabled": True, "chunk": 4, "nan_check": False, "ladder": "bf16",
                      "keep_dtype": True, "offload": "device", "tiling": "always", "tile_mode": "fast",
                      "tile_size": 16}  # fmt: skip
    with pytest.raises(ValueError, match=r"Tiled decode.*'sideways' is not one of auto, always, never"):
        A.from_positional([True, 0, True, "webui settings", False, "cpu", "sideways"])
    with pytest.raises(ValueError, match=r"Max chunk.*999 is outside 0..64"):
        A.from_positional([True, 999])
    with pytest.raises(ValueError, match="expected true or false"):
        A.from_positional(["maybe"])


def test_settings_values_become_defaults_and_bad_ones_are_ignored():
    d = A.defaults({"vaebatch_tiling": "never", "vaebatch_chunk": "nonsense"})
    assert d["tiling"] == "never" and d["chunk"] == 0


def test_engine_options_and_ladder_follow_the_webui_settings():
    assert A.ladder_for("webui settings", webui_bf16=True, webui_fp32=True) == ("bf16", "fp32")
    assert A.ladder_for("webui settings", webui_bf16=False, webui_fp32=True) == ("fp32",)
    assert A.ladder_for("webui settings", webui_bf16=False, webui_fp32=False) == ()
    assert A.ladder_for("bf16", webui_bf16=False, webui_fp32=False) == ("bf16",)
    opts = A.engine_options(
        {**A.defaults(), "chunk": 3, "tile_size": 16}, ladder=("fp32",), nan_check_allowed=False
    )
    assert (
        opts.max_chunk == 3 and opts.tile_size == 16 and opts.nan_check is False and opts.ladder == ("fp32",)
    )


def test_javascript_reads_the_help_the_script_renders():
    js = (ROOT / "javascript" / "vaebatch.js").read_text()
    assert "vaebatch-help" in js and "data-help" in js and "window.vaebatch" in js
