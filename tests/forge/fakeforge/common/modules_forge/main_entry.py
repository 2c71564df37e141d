"""modules_forge/main_entry.py (reference §3): the checkpoint to load is chosen here, loaded later
by sd_models.forge_model_reload."""

from __future__ import annotations

refresh_calls: list[int] = []


def refresh_model_loading_parameters():
    from modules import sd_models

    refresh_calls.append(1)
    sd_models.model_data.forge_loading_parameters = {"checkpoint_info": sd_models.select_checkpoint()}
