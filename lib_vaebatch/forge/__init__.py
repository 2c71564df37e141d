"""The Forge family as a host: Forge Neo, lllyasviel's Forge, reForge and Forge Classic.

Everything Forge-specific lives here: which Forge this is and which of its two backends it runs
(:mod:`.detect`, by capability), one small adapter per backend (:mod:`.adapters`: the VAE of a
model, its latent scaling, the memory manager), the VAE behind the engine's interface
(:mod:`.backend`), and the hand-back guard for what the engine does not drive. The shared webui
glue (:mod:`lib_vaebatch.webui`) asks this package for the backend; nothing here imports the glue.

The only modules of the host touched here are Forge's: ``backend.*`` (Forge and Neo),
``ldm_patched.*`` (Classic and reForge), ``modules_forge.*`` and ``modules.*``; all of them are
imported lazily, so the package imports without a host.
"""
