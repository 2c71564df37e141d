"""The seam every front end plugs into: what a host provides (:class:`Host`: its VAEs, where
output goes), how a job reports progress and learns it should stop (:class:`Reporter`), the one
error a user can fix (:class:`UserError`), and the engine options a user may send, checked
(:func:`checked_engine_options`).

The standalone app, the webui and Forge's "Latent Batch" tab, the HTTP API and the ComfyUI nodes
each implement it with their own host; it sits below all of them and imports none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_vaebatch.backends.base import VAEBackend
from lib_vaebatch.engine.options import EngineOptions
from lib_vaebatch.families import Family
from lib_vaebatch.writer import SaveFn


class UserError(ValueError):
    """Something the user can fix; shown as one line, never as a traceback."""


ProgressFn = Callable[[int, int, str], None]


@dataclass
class Reporter:
    """How a job reports progress and learns it should stop (host-specific behind the scenes)."""

    progress: ProgressFn | None = None
    cancel: Callable[[], bool] | None = None

    def __call__(self, done: int, total: int, text: str = "") -> None:
        if self.progress is not None:
            self.progress(done, total, text)

    def cancelled(self) -> bool:
        return bool(self.cancel and self.cancel())


class Host(ABC):
    """What differs between the webui and the standalone app."""

    #: hide the server-side folder fields (the webui's --hide-ui-dir-config)
    hide_dirs: bool = False
    #: help under the VAE dropdown
    vae_help: str = "The VAE that encodes and decodes"
    #: a custom save (the webui's save_image), given a :class:`~lib_vaebatch.writer.WriteJob`;
    #: None saves with our own namer and the request's ``pattern``
    save_fn: SaveFn | None = None

    @abstractmethod
    def vae_labels(self) -> list[str]: ...

    def refresh_vaes(self) -> list[str]:
        return self.vae_labels()

    @abstractmethod
    def default_vae(self) -> str: ...

    @abstractmethod
    def backend(self, label: str, family: Family | None = None) -> VAEBackend:
        """The backend for a dropdown label (``family``: what the latents say, for the built-in VAE)."""

    @abstractmethod
    def output_dir(self) -> Path: ...

    def infotext_values(self) -> dict[str, Any]:
        """Extra values for filename tokens (model name...)."""
        return {}


_BOOL_OPTIONS = ("nan_check", "keep_recovered_dtype", "escalate_remaining", "calibrate")
_STR_OPTIONS = ("chunk_mode", "offload", "output_dtype", "tiling", "tile_mode")
_COUNT_OPTIONS = ("max_chunk", "tile_size", "memory_budget")  # positive integers or None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked_engine_options(values: dict[str, Any] | None) -> EngineOptions:
    """:meth:`EngineOptions.from_mapping` with the types checked first, so a value of the wrong type
    (``"no"`` for a flag, a string budget) is refused here instead of being taken as truthy or
    failing mid-job, and ``offload`` names a device that exists. ValueError names the option."""
    values = dict(values or {})
    for name, value in values.items():
        if value is None and name in (*_COUNT_OPTIONS, "ladder"):
            continue
        if name in _BOOL_OPTIONS and not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {_show(value)}")
        if name in _STR_OPTIONS and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, not {_show(value)}")
        if name in _COUNT_OPTIONS and not (_is_int(value) and value >= 1):
            raise ValueError(f"{name} must be a positive integer, not {_show(value)}")
        if name == "memory_fraction" and not (
            (_is_int(value) or isinstance(value, float)) and 0.05 <= value <= 1.0
        ):
            raise ValueError(f"memory_fraction must be a number within 0.05..1, not {_show(value)}")
        if name == "ladder" and not (
            isinstance(value, str)
            or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))
        ):
            raise ValueError(f"ladder must be a list of dtype names (fp16, bf16, fp32), not {_show(value)}")
    try:
        options = EngineOptions.from_mapping(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    _check_offload(options.offload)
    return options


def _check_offload(offload: str) -> None:
    if offload in ("cpu", "device"):
        return
    import torch

    try:
        dev = torch.device(offload)
    except RuntimeError:
        raise ValueError(f"offload must be 'cpu', 'device' or a device name, not {offload!r}") from None
    usable = (
        dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
    ) or (dev.type == "mps" and torch.backends.mps.is_available())
    if not usable:
        raise ValueError(f"offload device {offload!r} is not available here")
