"""The "Latent Batch" Gradio UI, shared by the webui tab and the standalone ``serve`` app."""
