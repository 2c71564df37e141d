"""VAE Batch: batch VAE encode/decode that never loses a batch.

The core package (everything but :mod:`lib_vaebatch.webui`) imports nothing from the webui and no
gradio, so it runs on its own: ``python -m lib_vaebatch --help``.
"""

__version__ = "0.1.0"
