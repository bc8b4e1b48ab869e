"""The block-mask IR that every sparsity method emits and every lowering compiles.

``block_mask`` (the IR), ``validation`` (every check, host and device), ``csr`` (the one
place that builds and transforms the lists), ``unselected`` (what unlisted blocks get),
``serialization`` (files, no pickle), ``draw`` (pictures), ``placement`` (lists between the host
and devices). This package imports NumPy only; torch is imported inside the functions that
handle device masks.
"""

from .block_mask import BlockMask
from .unselected import Unselected

__all__ = ["BlockMask", "Unselected"]
