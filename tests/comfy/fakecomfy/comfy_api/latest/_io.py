"""comfy_api/latest/_io.py, the subset the pack uses (reference §3.3): typed inputs and outputs, the
``Schema``, ``ComfyNode`` (classmethods only: ComfyUI runs a clone of the class per call, with
``cls.hidden`` set), ``NodeOutput``, ``Hidden``. ``Schema.v1_info`` gives the ``/object_info``
shape (required/optional inputs as ``(TYPE, options)``; a V3 combo is ``("COMBO", {"options": [...]})``,
which v0.3.64's prompt validation does not check against its options: only V1 list combos are)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


def _pruned(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


class Input:
    io_type = "*"

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, lazy: bool | None = None, extra_dict: dict | None = None):  # fmt: skip
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip

    def options(self) -> dict[str, Any]:
        return _pruned({"display_name": self.display_name, "tooltip": self.tooltip})

    def v1(self) -> tuple[Any, dict[str, Any]]:
        return (self.io_type, self.options())


class WidgetInput(Input):
    def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                 tooltip: str | None = None, default: Any = None, **kwargs: Any):  # fmt: skip
        super().__init__(id, display_name, optional, tooltip)
        self.default = default

    def options(self) -> dict[str, Any]:
        return super().options() | _pruned({"default": self.default})


class Output:
    io_type = "*"

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False):  # fmt: skip
        self.id, self.display_name, self.tooltip, self.is_output_list = (
            id,
            display_name,
            tooltip,
            is_output_list,
        )


def _type(io_type: str, widget: type[Input] = Input) -> type:
    inp = type("Input", (widget,), {"io_type": io_type})
    out = type("Output", (Output,), {"io_type": io_type})
    return type(io_type.title(), (), {"io_type": io_type, "Input": inp, "Output": out})


Latent = _type("LATENT")
Vae = _type("VAE")
Image = _type("IMAGE")
Mask = _type("MASK")


class Boolean:
    io_type = "BOOLEAN"

    class Input(WidgetInput):
        io_type = "BOOLEAN"

    class Output(Output):
        io_type = "BOOLEAN"


class Int:
    io_type = "INT"

    class Input(WidgetInput):
        io_type = "INT"

        def __init__(self, id: str, display_name: str | None = None, optional: bool = False,
                     tooltip: str | None = None, default: int | None = None, min: int | None = None,
                     max: int | None = None, step: int | None = None, **kwargs: Any):  # fmt: skip
            super().__init__(id, display_name, optional, tooltip, default)
            self.min, self.max, self.step = min, max, step

        def options(self) -> dict[str, Any]:
            return super().options() | _pruned({"min": self.min, "max": self.max, "step": self.step})

    class Output(Output):
        io_type = "INT"


class String:
    io_type = "STRING"

    class Input(WidgetInput):
        io_type = "STRING"

    class Output(Output):
        io_type = "STRING"


class Combo:
    io_type = "COMBO"

    class Input(WidgetInput):
        io_type = "COMBO"

        def __init__(self, id: str, options: list[str] | None = None, display_name: str | None = None,
                     optional: bool = False, tooltip: str | None = None, default: Any = None, **kwargs: Any):  # fmt: skip
            super().__init__(id, display_name, optional, tooltip, default)
            self.choices = list(options or [])

        def options(self) -> dict[str, Any]:  # V3 combos: ("COMBO", {..., "options": [...]})
            return super().options() | {"multiselect": False, "options": self.choices}


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class HiddenHolder:
    def __init__(self, unique_id: str | None = None, prompt: Any = None, extra_pnginfo: Any = None):
        self.unique_id, self.prompt, self.extra_pnginfo = unique_id, prompt, extra_pnginfo


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    hidden: list[Hidden] = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self) -> None:
        ids = [i.id for i in self.inputs]
        if len(ids) != len(set(ids)):
            raise ValueError(f"Input ids must be unique: {ids}")

    def v1_info(self) -> dict[str, Any]:
        """What ``GET /object_info/<node_id>`` shows for this node."""
        inputs: dict[str, dict[str, Any]] = {"required": {}}
        for inp in self.inputs:
            inputs.setdefault("optional" if inp.optional else "required", {})[inp.id] = inp.v1()
        for h in self.hidden:
            inputs.setdefault("hidden", {})[h.name] = (h.value,)
        return {
            "input": inputs,
            "input_order": {k: list(v) for k, v in inputs.items()},
            "output": [o.io_type for o in self.outputs],
            "output_is_list": [o.is_output_list for o in self.outputs],
            "output_name": [o.display_name or o.io_type for o in self.outputs],
            "name": self.node_id,
            "display_name": self.display_name,
            "description": self.description,
            "category": self.category,
            "output_node": self.is_output_node,
        }


class NodeOutput:
    def __init__(
        self, *args: Any, ui: Any = None, expand: dict | None = None, block_execution: str | None = None
    ):
        self.args, self.ui = args, ui

    @property
    def result(self) -> tuple[Any, ...] | None:
        return self.args or None


class ComfyNode:
    hidden: HiddenHolder | None = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.validate()
        return schema
