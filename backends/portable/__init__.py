"""The portable torch lowering: any torch device (CPU, CUDA, MPS, XPU), gather + exact attention per query block.

The CPU path and the fallback where no native lowering exists; plans from the mask's lists on the device.
"""

from .lowering import PortableBackend

BACKENDS = (PortableBackend(),)
