"""``python -m fastlivt.data_prep`` is ``fastlivt convert``."""
import sys

from fastlivt.data_prep.cli import run_as_program

sys.exit(run_as_program())
