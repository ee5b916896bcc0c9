"""Logging for entry points (stages, CLI); the library itself only uses logging.getLogger(__name__)."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: str | None = None) -> None:
    """Timestamped INFO logs on stderr; VLM_FACTORY_LOG=DEBUG for more. Quietens chatty dependencies."""
    logging.basicConfig(
        level=(level or os.environ.get("VLM_FACTORY_LOG", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. the torchvision fallback notice, irrelevant on CPU-only installs
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
