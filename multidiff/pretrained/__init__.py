"""Published models: diffusers pipeline directories imported as multidiff models (``docs/pretrained.md``)."""

from multidiff.pretrained.pipelines import FAMILIES, PretrainedError, is_pipeline_dir, pipeline_config

__all__ = ["FAMILIES", "PretrainedError", "is_pipeline_dir", "pipeline_config"]
