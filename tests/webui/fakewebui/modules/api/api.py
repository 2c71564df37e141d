"""The API's script-argument mapping (reference §5.2): defaults from calling ``ui()`` again,
scripts matched by lower-cased title, positional ``args`` copied into the script's slice."""

from __future__ import annotations

import gradio as gr


class HTTPError(Exception):
    def __init__(self, status, detail):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


def script_name_to_index(name, scripts):
    try:
        return [script.title().lower() for script in scripts].index(name.lower())
    except ValueError:
        raise HTTPError(422, f"Script '{name}' not found") from None


def init_default_script_args(script_runner):
    last_arg_index = 1
    for script in script_runner.scripts:
        if last_arg_index < script.args_to:
            last_arg_index = script.args_to
    script_args = [None] * last_arg_index
    script_args[0] = 0
    with gr.Blocks():
        for script in script_runner.scripts:
            if script.ui(script.is_img2img):
                ui_default_values = [c.value for c in script.ui(script.is_img2img)]
                script_args[script.args_from : script.args_to] = ui_default_values
    return script_args


def init_script_args(alwayson_scripts, default_script_args, script_runner):
    script_args = list(default_script_args)
    for alwayson_script_name, value in alwayson_scripts.items():
        script = script_runner.scripts[script_name_to_index(alwayson_script_name, script_runner.scripts)]
        if not script.alwayson:
            raise HTTPError(422, "Cannot have a selectable script in the always on scripts params")
        if "args" in value:
            for idx in range(min((script.args_to - script.args_from), len(value["args"]))):
                script_args[script.args_from + idx] = value["args"][idx]
    return script_args
