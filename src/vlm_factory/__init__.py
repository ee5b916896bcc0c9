"""vlm-factory: gated on-device artifacts from one LLaVA-style vision-language model."""

__version__ = "0.1.0"
