"""Logging set-up for the Flower app processes (the Hydra entry point has its own)."""

from __future__ import annotations

import logging

_FORMAT = "%(levelname)-7s docl %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Give the package logger one stream handler, once per process."""
    logger = logging.getLogger("docl_flower")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
