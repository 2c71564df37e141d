"""Fake ``comfy_api`` (see ../README.md)."""
