"""NVIDIA GPU lowerings: a Triton block-sparse FlashAttention kernel (any mask, and AdaSpa's block-mass pass),
FlashAttention-4's block sparsity (any mask, Hopper/Blackwell) and FlashInfer (uniform blocks).

Importing this package imports none of triton, flash_attn or flashinfer; the lowerings do, when used.
May import: ``sparsecore.ir``, ``sparsecore.registry``, ``sparsecore.capabilities`` (never
``sparsecore.kernel``, the methods or the integrations).
"""

from .fa4_backend import Fa4Backend
from .flashinfer_backend import FlashInferBackend
from .triton_backend import TritonBackend

BACKENDS = (TritonBackend(), Fa4Backend(), FlashInferBackend())
