"""AUTOMATIC1111 webui entry point of VAE Batch.

This file stays thin: the webui executes every ``scripts/*.py`` of an extension (again on each
"Reload UI"), so all logic lives in the importable ``lib_vaebatch`` package. The "VAE Batch" script
and its webui glue (``lib_vaebatch.webui``) are not part of this release yet; until they land this
module registers nothing and the extension only provides its dependencies and the standalone tool
(``python -m lib_vaebatch``).
"""
