"""The project's one log handler: every logger is named ``fastlivt.<module>`` and writes through a stderr handler on
the ``fastlivt`` logger (``[HH:MM:SS LEVEL name] message``; at rank > 0 warnings only).

``fastlivt.data_prep`` modules log through the standard library (``logging.getLogger("fastlivt.data_prep.<module>")``);
:func:`install_stderr_handler` is called by the ``fastlivt`` logger factory (:func:`fastlivt.logs.get_logger`) and by
``fastlivt convert``, whichever comes first in a process.
"""
from __future__ import annotations

import logging
import os
import sys

ROOT_LOGGER = "fastlivt"
HANDLER_NAME = "fastlivt-stderr"
LOG_FORMAT, TIME_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"


def install_stderr_handler() -> logging.Logger:
    """The ``fastlivt`` logger, given its stderr handler unless it has it already (a second call adds nothing)."""
    root = logging.getLogger(ROOT_LOGGER)
    if any(h.get_name() == HANDLER_NAME for h in root.handlers):
        return root
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, TIME_FORMAT))
    root.addHandler(handler)
    rank = int(os.environ.get("RANK", "0"))
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    return root
