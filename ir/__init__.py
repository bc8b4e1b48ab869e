"""The block-mask IR that every sparsity method emits and every lowering compiles."""

from .block_mask import BlockMask

__all__ = ["BlockMask"]
