"""The fake ComfyUI the glue tests run the pack in: the fake packages (tests/comfy/fakecomfy) on
``sys.path``, the pack loaded the way ComfyUI's ``load_custom_node`` loads a V3 pack (the
repository root's ``__init__.py`` imported from its folder, ``comfy_entrypoint`` awaited, the node
list registered by ``schema.node_id``), and a small executor written from reference §3 and the
snapshot's execution.py: prompt validation as ``validate_inputs`` does it (required inputs, type
conversion, combos, min/max for the inputs a node's ``validate_inputs`` does not name, then that
function), the interrupt check before every node, the main.py progress hook (it raises the
interrupt on every update), nodes run under ``torch.inference_mode()``, list outputs mapped over,
``ui`` kept per node as ``/history`` shows it. Constants in a graph may be Python objects (a VAE),
which real API prompts carry as links from a loader node."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FAKE = Path(__file__).resolve().parent / "fakecomfy"
ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "sd-webui-vae-batch"  # the folder name a clone into custom_nodes/ has


class PromptError(Exception):
    """What ``POST /prompt`` answers with HTTP 400: ``node_errors`` per node id."""

    def __init__(self, node_errors: dict[str, list[dict[str, Any]]]) -> None:
        super().__init__(node_errors)
        self.node_errors = node_errors


@dataclass
class History:
    """``/history/<id>`` of one prompt: status, and per node its outputs' values and ``ui``."""

    status: str
    outputs: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    error: BaseException | None = None


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in ("comfy", "comfy_api", PACK_NAME) or name.startswith("lib_vaebatch.comfy."):
            del sys.modules[name]


class FakeComfy:
    def __init__(self) -> None:
        self.mm = importlib.import_module("comfy.model_management")
        self.utils = importlib.import_module("comfy.utils")
        self.sd = importlib.import_module("comfy.sd")
        self.progress: list[tuple[int, int, str | None]] = []
        self.utils.set_progress_bar_global_hook(self._hook)
        self.nodes: dict[str, type] = {}

    def _hook(self, value: int, total: int, preview: Any, node_id: str | None = None) -> None:
        # main.py's hook: the websocket "progress" message, then the interrupt check
        self.progress.append((value, total, node_id))
        self.mm.throw_exception_if_processing_interrupted()

    # -- loading ----------------------------------------------------------------------------------
    def load_pack(self) -> dict[str, type]:
        """As ``load_custom_node`` (nodes.py:2111-2197) loads a folder with a V3 entry point."""
        spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])  # fmt: skip
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
        assert not hasattr(module, "NODE_CLASS_MAPPINGS"), "a V3 pack: no V1 mappings"
        self.web_directory = getattr(module, "WEB_DIRECTORY", None)
        entry = module.comfy_entrypoint
        extension = entry()
        if inspect.iscoroutine(extension):
            extension = asyncio.run(extension)
        from comfy_api.latest import ComfyExtension

        assert isinstance(extension, ComfyExtension)
        asyncio.run(extension.on_load())
        for cls in asyncio.run(extension.get_node_list()):
            self.nodes[cls.GET_SCHEMA().node_id] = cls
        return self.nodes

    def vae(self, module: torch.nn.Module, **kw: Any) -> Any:
        """A ``comfy.sd.VAE`` built from a tiny VAE's weights, in ldm naming (as VAELoader does)."""
        from lib_vaebatch.backends.keys import diffusers_to_ldm

        return self.sd.VAE(sd=diffusers_to_ldm(module.state_dict()), **kw)

    # -- validation (execution.py validate_inputs) -------------------------------------------------
    def validate(self, node_id: str, cls: type, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        info = cls.GET_SCHEMA().v1_info()["input"]
        errors = []
        declared = {**info.get("required", {}), **info.get("optional", {})}
        for name in info.get("required", {}):
            if name not in inputs:
                errors.append({"type": "required_input_missing", "details": name})
        fn = getattr(cls, "validate_inputs", None)
        spec = inspect.getfullargspec(fn) if fn is not None else None
        named = [a for a in (spec.args if spec else []) if a != "cls"]
        kwargs = bool(spec and spec.varkw)
        for name, value in list(inputs.items()):
            if name not in declared or _is_link(value):
                continue
            kind, extra = declared[name]
            convert = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
            try:
                if isinstance(kind, str) and kind in convert:
                    value = convert[kind](value)
                inputs[name] = value
            except (TypeError, ValueError) as exc:
                errors.append({"type": "invalid_input_type", "details": f"{name}, {value}, {exc}"})
                continue
            if name in named or kwargs:
                continue
            if "min" in extra and value < extra["min"]:
                errors.append({"type": "value_smaller_than_min", "details": name})
            elif "max" in extra and value > extra["max"]:
                errors.append({"type": "value_bigger_than_max", "details": name})
            elif isinstance(kind, list) and value not in kind:
                errors.append({"type": "value_not_in_list", "details": f"{name}: '{value}' not in {kind}"})
        if fn is not None and not errors:
            given = {k: v for k, v in inputs.items() if (k in named or kwargs) and not _is_link(v)}
            r = fn(**given)
            if r is not True:
                for name in given:
                    errors.append({"type": "custom_validation_failed", "details": f"{name} - {r}"})
        return errors

    # -- running ------------------------------------------------------------------------------------
    def prompt(self, graph: dict[str, dict[str, Any]]) -> History:
        """Validate (HTTP 400 as :class:`PromptError`), then run every node in order of its links."""
        node_errors = {}
        for nid, node in graph.items():
            errs = self.validate(nid, self.nodes[node["class_type"]], dict(node["inputs"]))
            if errs:
                node_errors[nid] = errs
        if node_errors:
            raise PromptError(node_errors)
        history = History("success")
        try:
            for nid in _order(graph):
                self.mm.throw_exception_if_processing_interrupted()  # nodes.py before_node_execution
                cls = self.nodes[graph[nid]["class_type"]]
                inputs = {
                    k: (history.outputs[v[0]][v[1]] if _is_link(v) else v)
                    for k, v in graph[nid]["inputs"].items()
                }
                self.validate(nid, cls, inputs)  # the conversions ComfyUI applies
                result, ui = self.run(cls, inputs, nid)
                history.outputs[nid] = result
                if ui:
                    history.ui[nid] = ui
                history.executed.append(nid)
        except self.mm.InterruptProcessingException as exc:
            history.status, history.error = "interrupted", exc
        except Exception as exc:
            history.status, history.error = "error", exc
        return history

    def run(self, cls: type, inputs: dict[str, Any], node_id: str = "1") -> tuple[tuple[Any, ...], dict]:
        """One node; a list input (from a list output) runs it once per item, outputs joined."""
        from comfy_api.latest._io import HiddenHolder

        schema = cls.GET_SCHEMA()
        lists = {k: v for k, v in inputs.items() if isinstance(v, _List)}
        n = max((len(v) for v in lists.values()), default=1)
        results, uis = [], {}
        for i in range(n):
            call = {k: (v[min(i, len(v) - 1)] if k in lists else v) for k, v in inputs.items()}
            clone = type(cls.__name__, (cls,), {"hidden": HiddenHolder(unique_id=node_id)})
            with torch.inference_mode():
                out = clone.execute(**call)
            results.append(out.result)
            if out.ui is not None:
                for key, value in out.ui.as_dict().items():
                    uis.setdefault(key, []).extend(value)
        merged = []
        for k, o in enumerate(schema.outputs):
            if o.is_output_list:
                merged.append(_List(item for r in results for item in r[k]))
            else:
                merged.append(results[0][k] if n == 1 else _List(r[k] for r in results))
        return tuple(merged), uis


class _List(list):
    """A list output: a node taking it runs once per item."""


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and not isinstance(value, _List)
        and len(value) == 2
        and isinstance(value[0], str)
    )


def _order(graph: dict[str, dict[str, Any]]) -> list[str]:
    done: list[str] = []

    def visit(nid: str) -> None:
        if nid in done:
            return
        for v in graph[nid]["inputs"].values():
            if _is_link(v):
                visit(v[0])
        done.append(nid)

    for nid in graph:
        visit(nid)
    return done


@contextlib.contextmanager
def fake_comfy() -> Iterator[FakeComfy]:
    _purge()
    sys.path.insert(0, str(FAKE))
    try:
        host = FakeComfy()
        host.mm.reset()
        yield host
    finally:
        sys.path.remove(str(FAKE))
        _purge()
