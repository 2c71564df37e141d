"""The differences between gradio 3.41 (AUTOMATIC1111) and gradio 4.40 (Forge), in one place.

Everything else in the UI is written against what both versions accept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import gradio as gr

VERSION = tuple(int(p) for p in gr.__version__.split(".")[:2] if p.isdigit())
GRADIO4 = VERSION >= (4, 0)


def js_kwargs(js: str | None) -> dict[str, Any]:
    """The keyword that attaches a JavaScript function to an event (``_js`` in 3.x, ``js`` in 4.x)."""
    if not js:
        return {}
    return {"js": js} if GRADIO4 else {"_js": js}


def upload_kwargs() -> dict[str, Any]:
    """A ``gr.File`` whose value reaches the handler as paths (4.x) or temp-file objects (3.x)."""
    return {"type": "filepath"} if GRADIO4 else {"type": "file"}


def file_paths(value: Any) -> list[str]:
    """Paths of uploaded files, whatever shape this gradio version hands them over in."""
    if value is None:
        return []
    items: Iterable[Any] = value if isinstance(value, list | tuple) else [value]
    out: list[str] = []
    for item in items:
        if isinstance(item, str | os.PathLike):
            out.append(os.fspath(item))
        elif isinstance(item, dict):
            path = item.get("path") or item.get("name")
            if path:
                out.append(str(path))
        elif getattr(item, "name", None):  # 3.x: tempfile wrapper
            out.append(str(item.name))
        elif getattr(item, "path", None):  # 4.x FileData
            out.append(str(item.path))
    return out


def queue(blocks: gr.Blocks, concurrency: int = 1) -> gr.Blocks:
    """Enable the queue (needed for progress) with ``concurrency`` events at a time."""
    if GRADIO4:
        return blocks.queue(default_concurrency_limit=concurrency)
    return blocks.queue(concurrency_count=concurrency)


def update(**kwargs: Any) -> Any:
    """A property update for any component (``gr.update`` exists in both)."""
    return gr.update(**kwargs)
