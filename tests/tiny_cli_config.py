"""run.py config for subprocess tests: `--config=tests/tiny_cli_config.py:<dir>` builds the
tiny run of tiny_run.py (data and backbone made in <dir> if missing)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from tiny_run import tiny_config  # noqa: E402


def get_config(arg):
    return tiny_config(pathlib.Path(arg))
