"""`python -m vpit ...`: the same as the `vpit` console script."""

import sys

from vpit.cli import main

if __name__ == "__main__":
    sys.exit(main())
