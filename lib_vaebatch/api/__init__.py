"""HTTP API: the ``/vaebatch/v1`` routes (JSON) and, beside them, the Hybrid Inference remote-VAE
endpoints. Framework-free work in :mod:`service`; FastAPI glue in :mod:`routes`."""
