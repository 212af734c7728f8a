"""``python -m data_prep`` is ``fastlivt convert``."""
import sys

from data_prep.cli import main

sys.exit(main())
