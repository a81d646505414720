"""``python -m ddim_fast``: the command-line tools (see ``ddim_fast.tools.cli``)."""

import sys

from ddim_fast.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
