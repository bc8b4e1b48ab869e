"""The portable torch lowering: any torch device, gather + exact attention per query block."""

from .lowering import PortableBackend

BACKENDS = (PortableBackend(),)
