"""Modality-agnostic diffusion core: tensors in, tensors out (torch only)."""
