"""One logger for the project: ``get_logger(__name__)``; rank > 0 logs warnings only."""
from __future__ import annotations

import logging

from fastlivt.data_prep.log_handler import ROOT_LOGGER, install_stderr_handler


def get_logger(name: str = ROOT_LOGGER) -> logging.Logger:
    install_stderr_handler()
    if not name.startswith(ROOT_LOGGER):
        name = f"{ROOT_LOGGER}.{name}"
    return logging.getLogger(name)
