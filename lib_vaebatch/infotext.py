"""Infotext, the webui's generation-parameters text, built and parsed the way its PNG Info reads it.

Format: the prompt (any lines), an optional ``Negative prompt: ...`` line (and continuation lines),
and a last line of ``Key: value`` pairs separated by ``, ``. Values holding ``,``, ``:`` or a newline
are JSON-quoted. The webui treats the last line as parameters only when it holds at least three
pairs, so everything we write carries at least three.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"


def quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        return value if isinstance(value, str) else text
    return text


def format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None and v != "")


def parse_params(line: str) -> dict[str, str]:
    return {k.strip(): unquote(v.strip()) for k, v in _PARAM.findall(line)}


@dataclass
class Infotext:
    prompt: str = ""
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        lines = [self.prompt] if self.prompt else []
        if self.negative_prompt:
            lines.append(f"{NEGATIVE} {self.negative_prompt}")
        if self.params:
            lines.append(format_params(self.params))
        return "\n".join(lines)


def parse(text: str) -> Infotext:
    """Split an infotext into prompt, negative prompt and parameters."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    params: dict[str, str] = {}
    if len(_PARAM.findall(last)) >= 3:
        params = parse_params(last)
        lines = lines[:-1]
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(NEGATIVE):
            in_negative = True
            stripped = stripped[len(NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(stripped)
    return Infotext("\n".join(prompt).strip(), "\n".join(negative).strip(), params)


def with_params(text: str | None, params: Mapping[str, Any]) -> str:
    """``text`` with ``params`` set (replacing keys already there); a new infotext when ``text``
    is empty. Prompt lines are kept verbatim."""
    base = parse(text) if text else Infotext()
    merged = dict(base.params)
    for key, value in params.items():
        if value is None or value == "":
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return Infotext(base.prompt, base.negative_prompt, merged).text()
