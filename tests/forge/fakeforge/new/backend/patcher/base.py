"""backend/patcher/base.py: ModelPatcher as far as the VAE uses it."""


class ModelPatcher:
    def __init__(self, model, load_device, offload_device):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.model_options = {}

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.model_options = dict(self.model_options)
        return n
