"""Makes the optional engines unimportable in a Python that has them installed, as on a machine without them.

Put this folder first on ``PYTHONPATH`` and name the modules in ``FASTLIVT_BLOCK_MODULES`` (comma-separated, e.g.
``ffcv,nvidia.dali,xformers,deepspeed``): importing one of them, or any submodule, raises ``ModuleNotFoundError``
exactly where Python would raise it for a package that is not installed (a meta-path finder ahead of every other).
"""
import os
import sys

BLOCKED = tuple(m for m in os.environ.get("FASTLIVT_BLOCK_MODULES", "").split(",") if m)


class _BlockEngines:
    @staticmethod
    def find_spec(name, path=None, target=None):
        for blocked in BLOCKED:
            if name == blocked or name.startswith(blocked + "."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: FASTLIVT_BLOCK_MODULES)", name=name)
        return None


if BLOCKED:
    sys.meta_path.insert(0, _BlockEngines())
