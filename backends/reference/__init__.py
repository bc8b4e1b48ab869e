"""The NumPy reference lowering: the executable definition of the IR's semantics (float64, readable over fast).

The property suite's oracle is written independently in tests/; this lowering is what users run with
``device="reference"`` to see what every kernel must compute.
"""

from .lowering import ReferenceBackend

BACKENDS = (ReferenceBackend(),)
