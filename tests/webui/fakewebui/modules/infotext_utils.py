"""infotext_utils (reference §4.6): create_buttons, ParamBinding, register_paste_params_button."""

from __future__ import annotations

registered_bindings: list = []


class ParamBinding:
    def __init__(self, paste_button, tabname, source_text_component=None, source_image_component=None,
                 source_tabname=None, override_settings_component=None, paste_field_names=None):  # fmt: skip
        self.paste_button, self.tabname = paste_button, tabname
        self.source_text_component, self.source_image_component = (
            source_text_component,
            source_image_component,
        )
        self.source_tabname, self.paste_field_names = source_tabname, paste_field_names or []


def create_buttons(tabs_list):
    import gradio as gr

    return {tab: gr.Button(f"Send to {tab}", elem_id=f"{tab}_tab") for tab in tabs_list}


def register_paste_params_button(binding):
    registered_bindings.append(binding)
