"""``python -m fastlivt`` (and ``deepspeed --module fastlivt``) runs the CLI."""
import sys

from fastlivt.cli import main

sys.exit(main())
