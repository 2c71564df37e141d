"""Fake ComfyUI ``comfy`` package (see ../README.md)."""
