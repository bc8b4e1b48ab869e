"""NVIDIA GPU lowerings: a Triton block-sparse FlashAttention kernel (any mask) and FlashInfer (uniform blocks),
and the Triton implementation of AdaSpa's block-mass search (:mod:`.block_mass`).

Importing this package imports neither triton nor flashinfer; the lowerings do, when used.
"""

from sparsecore.search import register_block_mass

from . import block_mass
from .flashinfer_backend import FlashInferBackend
from .triton_backend import TritonBackend

BACKENDS = (TritonBackend(), FlashInferBackend())
register_block_mass("cuda", block_mass.run, name="triton", supports=block_mass.supports)
