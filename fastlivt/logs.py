"""One logger for the project: ``get_logger(__name__)``; rank > 0 logs warnings only."""
from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def get_logger(name: str = "fastlivt") -> logging.Logger:
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("fastlivt")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        rank = int(os.environ.get("RANK", "0"))
        root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        root.propagate = False
        _CONFIGURED = True
    if not name.startswith("fastlivt"):
        name = "fastlivt." + name
    return logging.getLogger(name)
