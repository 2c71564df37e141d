"""AUTOMATIC1111 webui entry point of VAE Batch (thin: the logic lives in ``lib_vaebatch``).

The webui executes every ``scripts/*.py`` of an extension (again on each "Reload UI") and
registers the ``scripts.Script`` subclasses it finds in the module's namespace: here, the one
imported below. ``lib_vaebatch`` is importable because the extension root is on ``sys.path`` while
this file runs.
"""

from lib_vaebatch.webui.script import VaeBatchScript  # noqa: F401  (found here by the webui)
from lib_vaebatch.webui.setup import register

register()
