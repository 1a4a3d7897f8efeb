"""The latent stage between the adapter and the core: ``encode(x) -> z``, ``decode(z) -> x``."""

from multidiff.autoencoders.base import AutoencoderError, Identity, LatentStage, load_stage

__all__ = ["AutoencoderError", "Identity", "LatentStage", "load_stage"]
