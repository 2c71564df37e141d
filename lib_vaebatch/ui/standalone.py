"""The standalone host: VAEs from ``--vae`` and ``--vae-dir``, our own saving, one job at a time,
and an interrupt flag instead of the webui's shared state."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lib_vaebatch.backends import APPROX, ApproxVAE, VAEBackend, load_vae
from lib_vaebatch.families import Family
from lib_vaebatch.host import Host, Reporter, UserError

APPROX_LABEL = "approx (built-in, preview quality)"
VAE_SUFFIXES = (".safetensors",)


class StandaloneHost(Host):
    vae_help = "The VAE that encodes and decodes (built-in approx: no download, preview quality)"

    def __init__(
        self,
        vae: str | None = None,
        vae_dir: str | Path | None = None,
        output_dir: str | Path = "outputs/latent-batch",
        *,
        device: torch.device | str = "cpu",
        family: str | None = None,
        hide_dirs: bool = False,
    ) -> None:
        self.vae = None if vae is None or vae.strip().lower() == APPROX else str(vae)
        self.vae_dir = Path(vae_dir) if vae_dir else None
        self.out = Path(output_dir)
        self.device = torch.device(device)
        self.family = family
        self.hide_dirs = hide_dirs
        self._loaded: tuple[str, VAEBackend] | None = None  # one file VAE in memory at a time
        self._approx: dict[str, ApproxVAE] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paths = self._scan()

    # -- VAEs ---------------------------------------------------------------------------------
    def _scan(self) -> dict[str, str | None]:
        """Dropdown label -> path (None: the built-in VAE). Files are listed by name."""
        paths: dict[str, str | None] = {APPROX_LABEL: None}
        if self.vae:
            paths[self._label(self.vae)] = self.vae
        if self.vae_dir and self.vae_dir.is_dir():
            for f in sorted(self.vae_dir.iterdir()):
                is_vae = (f.is_file() and f.suffix.lower() in VAE_SUFFIXES) or (f / "config.json").is_file()
                if is_vae:
                    paths.setdefault(f.name, str(f))
        return paths

    def vae_labels(self) -> list[str]:
        return list(self._paths)

    def refresh_vaes(self) -> list[str]:
        self._paths = self._scan()
        return self.vae_labels()

    @staticmethod
    def _label(spec: str) -> str:
        if spec.startswith(("remote:", "http://", "https://")):
            return "remote: " + spec.removeprefix("remote:")
        return Path(spec).name

    def default_vae(self) -> str:
        return self._label(self.vae) if self.vae else APPROX_LABEL

    def backend(self, label: str, family: Family | None = None) -> VAEBackend:
        if label not in self._paths:
            raise UserError(f"unknown VAE {label!r}; pick one from the list (refresh after adding files)")
        if label == APPROX_LABEL:
            name = (family.name if family else None) or self.family or "sd1"
            if name not in self._approx:
                self._approx[name] = ApproxVAE(name, device=self.device)
            return self._approx[name]
        if self._loaded is not None and self._loaded[0] == label:
            return self._loaded[1]
        self._loaded = None  # free the previous one first
        try:
            backend = load_vae(self._paths[label], family=self.family, device=self.device)
        except ImportError as exc:
            raise UserError(f"loading {label} needs the diffusers package ({exc})") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load VAE {label}: {exc}") from None
        self._loaded = (label, backend)
        return backend

    def output_dir(self) -> Path:
        return self.out

    # -- jobs ---------------------------------------------------------------------------------
    def interrupt(self) -> None:
        self._stop.set()

    def run(self, fn: Callable[[Reporter], Any], progress: Callable[[int, int, str], None] | None) -> Any:
        """One job at a time (as the webui's queue lock); the interrupt flag is cleared at its start."""
        with self._lock:
            self._stop.clear()
            return fn(Reporter(progress=progress, cancel=self._stop.is_set))
