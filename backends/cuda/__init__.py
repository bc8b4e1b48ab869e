"""NVIDIA GPU lowerings: a Triton block-sparse FlashAttention kernel (any mask) and FlashInfer (uniform blocks).

Importing this package imports neither triton nor flashinfer; the lowerings do, when used.
"""

from .flashinfer_backend import FlashInferBackend
from .triton_backend import TritonBackend

BACKENDS = (TritonBackend(), FlashInferBackend())
