"""ldm_patched/modules/latent_formats.py (reference §1.3): scaling lives on the UNet's latent format."""


class LatentFormat:
    scale_factor = 1.0

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


class SD15(LatentFormat):
    def __init__(self, scale_factor=0.18215):
        self.scale_factor = scale_factor


class SDXL(LatentFormat):
    def __init__(self):
        self.scale_factor = 0.13025
