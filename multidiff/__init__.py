"""multidiff: diffusion models across modalities with one modality-agnostic core."""

__version__ = "0.1.0"


def load(path, *, device=None, trusted_targets=(), modality=None, lora=None, lora_scale=None, channels_last=False,
         compile=False, compile_options=None):
    """Load an exported model directory, a ``.ckpt`` or a diffusers pipeline directory for generation
    (see :mod:`multidiff.pipeline`); ``modality`` picks one of a multimodal model's modalities, ``lora``
    and ``lora_scale`` add LoRA adapters on top (docs/pretrained.md)."""
    from multidiff.pipeline import load as _load

    return _load(path, device=device, trusted_targets=trusted_targets, modality=modality, lora=lora,
                 lora_scale=lora_scale, channels_last=channels_last, compile=compile, compile_options=compile_options)


__all__ = ["load", "__version__"]
