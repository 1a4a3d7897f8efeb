"""multidiff: diffusion models across modalities with one modality-agnostic core."""

__version__ = "0.1.0"


def load(path, *, device=None, trusted_targets=(), modality=None, channels_last=False, compile=False,
         compile_options=None):
    """Load an exported model directory or a ``.ckpt`` for generation (see :mod:`multidiff.pipeline`);
    ``modality`` picks one of a multimodal model's modalities."""
    from multidiff.pipeline import load as _load

    return _load(path, device=device, trusted_targets=trusted_targets, modality=modality,
                 channels_last=channels_last, compile=compile, compile_options=compile_options)


__all__ = ["load", "__version__"]
