"""comfy_api/latest/_ui.py's PreviewText: ``{"text": (value,)}`` in the node's ``ui``."""

from __future__ import annotations


class PreviewText:
    def __init__(self, value: str, **kwargs):
        self.value = value

    def as_dict(self):
        return {"text": (self.value,)}
