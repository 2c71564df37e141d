"""Options / OptionInfo (reference §3: on_ui_settings; ``add_option`` sets no section)."""

from __future__ import annotations

from typing import Any


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, comment_before="", comment_after="", infotext=None,
                 restrict_api=False, category_id=None):  # fmt: skip
        self.default, self.label, self.component, self.component_args = (
            default,
            label,
            component,
            component_args,
        )
        self.section, self.infotext, self.restrict_api = section, infotext, restrict_api
        self.reload_ui = False

    def needs_reload_ui(self) -> OptionInfo:
        self.reload_ui = True
        return self

    def info(self, text: str) -> OptionInfo:
        self.label += f" ({text})"
        return self


class Options:
    def __init__(self, defaults: dict[str, Any]) -> None:
        object.__setattr__(self, "data_labels", {k: OptionInfo(v) for k, v in defaults.items()})
        object.__setattr__(self, "data", {})

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info
        if key not in self.data and not getattr(info, "do_not_save", False):
            self.data[key] = info.default

    def __getattr__(self, item: str) -> Any:
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)  # §3: reading an unregistered key raises

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def get_default(self, key: str) -> Any:
        return self.data_labels[key].default
