"""scripts (reference §2): Script, AlwaysVisible, PostSampleArgs, ScriptRunner (args slicing, hook
dispatch with errors reported, never raised), discovery of Script subclasses in a script module's
namespace, ``sys.path`` holding the extension root only while the module executes."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections import namedtuple

import gradio as gr

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list[ScriptClassData] = []
errors: list[str] = []  # what errors.report would print


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    sorting_priority = 0

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        pass

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


HOOKS = ("setup", "before_process", "process", "before_process_batch", "process_batch", "post_sample",
         "before_hr", "postprocess_batch", "postprocess")  # fmt: skip


def load_scripts(extension_root: str) -> None:
    """Execute ``<root>/scripts/*.py`` as the webui does and register the Script subclasses."""
    from modules import script_callbacks

    script_callbacks.clear_callbacks()
    scripts_data.clear()
    folder = os.path.join(extension_root, "scripts")
    for fn in sorted(os.listdir(folder)):
        if not fn.endswith(".py"):
            continue
        path = os.path.join(folder, fn)
        saved = sys.path
        sys.path = [extension_root] + sys.path
        try:
            spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path = saved
        for obj in module.__dict__.values():
            if isinstance(obj, type) and issubclass(obj, Script):
                scripts_data.append(ScriptClassData(obj, path, extension_root, module))


class ScriptArg(dict):
    pass


class ScriptRunner:
    def __init__(self, is_img2img: bool):
        self.is_img2img = is_img2img
        self.scripts: list[Script] = []
        self.alwayson_scripts: list[Script] = []
        self.inputs: list = [None]

    def initialize_scripts(self):
        for data in scripts_data:
            script = data.script_class()
            script.filename = data.path
            script.is_txt2img = not self.is_img2img
            script.is_img2img = self.is_img2img
            script.tabname = "img2img" if self.is_img2img else "txt2img"
            visibility = script.show(self.is_img2img)
            if visibility == AlwaysVisible:
                script.alwayson = True
                self.alwayson_scripts.append(script)
            self.scripts.append(script)

    def create_script_ui(self, script: Script):
        script.args_from = script.args_to = len(self.inputs)
        controls = script.ui(script.is_img2img)
        if controls is None:
            return
        script.name = script.title().lower()
        script.api_info = {
            "name": script.name,
            "is_alwayson": script.alwayson,
            "is_img2img": script.is_img2img,
            "args": [
                {
                    "label": getattr(c, "label", None),
                    "value": getattr(c, "value", None),
                    "minimum": getattr(c, "minimum", None),
                    "maximum": getattr(c, "maximum", None),
                    "step": getattr(c, "step", None),
                    "choices": getattr(c, "choices", None),
                }
                for c in controls
            ],
        }
        self.inputs += list(controls)
        script.args_to = len(self.inputs)

    def setup_ui(self):
        with gr.Blocks():
            for script in self.scripts:
                self.create_script_ui(script)

    def _call(self, hook, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            if not hasattr(script, hook):
                continue
            args = p.script_args[script.args_from : script.args_to]
            try:
                getattr(script, hook)(p, *extra, *args, **kwargs)
            except Exception as exc:  # errors.report: never raised (§1.3, §2.2)
                errors.append(f"Error running {hook}: {script.filename}: {type(exc).__name__}: {exc}")

    def before_process(self, p):
        self._call("before_process", p)

    def process(self, p):
        self._call("process", p)

    def process_batch(self, p, **kwargs):
        self._call("process_batch", p, **kwargs)

    def post_sample(self, p, ps):
        self._call("post_sample", p, ps)

    def before_hr(self, p):
        self._call("before_hr", p)

    def postprocess_batch(self, p, images, **kwargs):
        self._call("postprocess_batch", p, images=images, **kwargs)

    def postprocess(self, p, processed):
        self._call("postprocess", p, processed)
