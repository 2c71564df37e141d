"""ComfyUI's entry into VAE Batch: the repository cloned into ``ComfyUI/custom_nodes/`` is a node
pack, and ComfyUI imports this file. A1111 and the Forge family never import it (they run
``scripts/vaebatch.py``), nor does ``pip install`` (which packages ``lib_vaebatch`` only).

Importing it does nothing but define names: the package beside it is put on ``sys.path`` and
imported only when ComfyUI asks for the nodes (``comfy_entrypoint``, the V3 API). Nothing is
installed at import time; ComfyUI-Manager installs ``requirements.txt``.
"""

import logging
import os
import sys

#: The pack's front-end scripts (growing image inputs, the report shown on the node).
WEB_DIRECTORY = "./web"

_HERE = os.path.dirname(os.path.abspath(__file__))


async def comfy_entrypoint():  # ComfyUI's V3 loader calls it
    if _HERE not in sys.path:
        sys.path.insert(0, _HERE)  # lib_vaebatch lives beside this file
    from lib_vaebatch.comfy import entrypoint

    return await entrypoint()


if "comfy" in sys.modules:  # loaded by ComfyUI: say at once if it is too old for the V3 API
    import importlib.util

    try:
        _v3 = importlib.util.find_spec("comfy_api.latest") is not None
    except ImportError:
        _v3 = False
    if not _v3:
        logging.warning("[VAE Batch] needs ComfyUI 0.3.47 or newer (its V3 node API); not loaded")
