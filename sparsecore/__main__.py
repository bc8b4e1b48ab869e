"""``python -m sparsecore``: the ``sparsecore`` command (:mod:`sparsecore.cli`)."""

import sys

from sparsecore.cli import main

if __name__ == "__main__":
    sys.exit(main())
