"""The NumPy reference lowering: the executable definition of the IR's semantics."""

from .lowering import ReferenceBackend

BACKENDS = (ReferenceBackend(),)
