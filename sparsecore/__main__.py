"""``python -m sparsecore``: the ``sparsecore`` command (:mod:`sparsecore.cli`)."""

import sys

from sparsecore.cli import main

sys.exit(main())
