"""The package logger. Every console line starts with ``[VAE Batch]``."""

from __future__ import annotations

import logging

PREFIX = "[VAE Batch]"

logger = logging.getLogger("vaebatch")


def setup_console(level: int = logging.INFO) -> None:
    """Send the package's log records to stderr with the ``[VAE Batch]`` prefix (idempotent)."""
    if any(getattr(h, "_vaebatch", False) for h in logger.handlers):
        logger.setLevel(level)
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{PREFIX} %(message)s"))
    handler._vaebatch = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
