"""FlashAttention-4's dense forward as sparsecore's dense attention on Hopper (the ``fa4`` backend's DenseOp).

The methods' dense steps (AdaSpa's and PASA's warm-up steps, AdaSpa's LSE pass, PISA's dense first
layer) run dense attention, which diffusers' default dispatch gives to torch SDPA's cuDNN kernel on
an H200. Side by side on one H200 (2026-12-01, ``bench/dense_kernels.py``, bf16, 12 heads, q, k, v as
``[B, S, H, D]`` views of head-major memory; torch 2.11.0+cu130, flash-attn-4 4.0.0b36;
``bench/results/gpu-2026-12-01-runs/sixth-session/dense-kernels.md``), FA4's dense forward against
cuDNN's, eff TFLOP/s:

- head dim 128: 671 / 637 / 666 against 608 / 579 / 559 at S = 32,768 / 98,304 / 188,760 (1.09-1.19x);
- head dim 64: 542 / 546 / 539 against 460 / 464 / 413 (1.18-1.30x);
- returning the LSE costs either kernel under 2%; outputs agree to 3.1e-3 relative L2 (bf16 rounding);
- a later call the same day (``dense-kernels-short.md``, ``dense-kernels-float16.md``): at S = 8,192 / 16,384
  674 / 668 against 617 / 612 (D = 128) and 547 / 539 against 465 / 460 (D = 64); fp16 at 32,768 / 188,760
  (D = 128) 651 / 639 against 592 / 547.

The first ask for a (device, dtype, head dim, GQA group) loads flash-attn-4 and compiles its kernels, with and
without the LSE (the model's dense steps ask none, the searches' dense pass does), on sparsecore's warm-up thread, on
a small sample of the asking call's inputs, while the caller runs cuDNN's (:func:`sparsecore.warmup.ready_for`;
``SPARSECORE_WARMUP=wait`` loads it in place).

So this op takes bf16 (and fp16) inputs of head dim 64 or 128 and at least :data:`MIN_TOKENS` tokens on
compute capability 9.x, with the flash-attn-4 version measured (others, shorter sequences and SM100 were not
timed: the caller's default runs). Batch and GQA groups are FA4's grid and were not timed apart.

API relied on (flash-attn-4 4.0.0b36, ``flash_attn/cute/interface.py``): the private
``_flash_attn_fwd(q, k, v, softmax_scale=..., causal=False, return_lse=..., out=...) -> (out, lse, ...)``
with ``q [B, Sq, H, D]``, ``k, v [B, Sk, Hkv, D]`` (unit last stride, 16-byte aligned other strides,
``H % Hkv == 0``); ``out`` may be any such layout (``validate_output_layout``), so we pass a
``[B, Sq, H, D]`` view of a head-major ``[B, H, Sq, D]`` tensor: the layout the diffusers op returns
without a copy (the public ``flash_attn_func`` allocates ``[B, Sq, H, D]`` itself). ``lse`` is
natural-log float32 ``[B, H, Sq]``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .positive_scale import positive_scale

MEASURED_HEAD_DIMS = (64, 128)
MEASURED_DTYPES = (torch.bfloat16, torch.float16)
MIN_TOKENS = 8192               # the shortest sequence measured (bench/dense_kernels.py)
SAMPLE_TILES = 8                # a warm-up's sample (_sample_run): this many 128-token tiles and the remainder


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None where FA4's dense forward runs these inputs and was measured faster than cuDNN's, else why not."""
    if not q.is_cuda:
        return f"tensors on {q.device}, not a CUDA device"
    if q.dtype not in MEASURED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: measured faster than cuDNN for {MEASURED_DTYPES} alike only"
    if q.shape[-1] not in MEASURED_HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return (f"head dims {q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]}: measured faster than cuDNN at "
                f"{MEASURED_HEAD_DIMS}, the same for q, k and v, only")
    if min(q.shape[2], k.shape[2]) < MIN_TOKENS:
        return f"{q.shape[2]} query and {k.shape[2]} key tokens: measured faster than cuDNN from {MIN_TOKENS} only"
    if k.shape != v.shape or q.shape[1] % k.shape[1]:
        return (f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}: expected k and v of one shape and query "
                f"heads a multiple of key heads")
    major, minor = torch.cuda.get_device_capability(q.device)
    if major != 9:
        return f"compute capability {major}.{minor}: measured faster than cuDNN on 9.x (H200) only"
    from sparsecore import warmup
    device = str(q.device)
    return warmup.ready_for((__name__, device, q.dtype, q.shape[-1], q.shape[1] // k.shape[1]),
                            lambda: _unavailable(device), lambda: _sample_run(q, k, v), q)


def _sample_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    """Runs of this op, with and without the LSE, on copies of the inputs' first ``SAMPLE_TILES`` tiles of 128 tokens
    plus their length's remainder (so a short last tile stays short): FA4 compiles per dtype, head dim, GQA group
    and LSE (``lse is None`` is in its compile key), not length or scale."""
    def cut(tensor: torch.Tensor) -> torch.Tensor:
        stop = min(tensor.shape[2], SAMPLE_TILES * 128 + tensor.shape[2] % 128)
        return tensor[:, :, :stop].detach().clone()            # no autograd graph back to the caller's
    q, k, v = cut(q), cut(k), cut(v)
    return lambda: [run(q, k, v, q.shape[-1] ** -0.5, return_lse) for return_lse in (True, False)]


@functools.lru_cache(maxsize=None)
def _unavailable(device: str) -> str | None:
    """Why the fa4 backend or the measured flash-attn-4 is missing on ``device`` (None: both are); once per device."""
    from sparsecore.registry import registered_backends

    from .fa4_occupancy import TESTED_VERSION, supported
    unavailable = registered_backends()["fa4"].unavailable_reason(device)
    if unavailable is not None:
        return unavailable
    if not supported():
        return f"flash-attn-4 is not {TESTED_VERSION}, the version measured and whose private forward this calls"
    return None


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
        return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention ``[B, H, L_q, D]`` (contiguous) and, if asked, its LSE ``[B, H, L_q]``; inputs as
    ``[B, H, L, D]`` with any strides FA4 takes (a copy is made by FA4 where they are not)."""
    q, scale = positive_scale(q, scale)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    with torch.cuda.device(q.device):
        written, lse = private_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                       causal=False, return_lse=return_lse, out=out.transpose(1, 2))
    require_written(written, out.transpose(1, 2), "pass dense_attention='model' to apply(), or call "
                    "sparsecore.search.dense_attention inside faster_dense_allowed(False)")
    return out, lse


def private_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> tuple[Any, Any]:
    """``flash_attn.cute.interface._flash_attn_fwd(q, k, v, **kwargs)``'s ``(out, lse)`` (it returns more):
    FA4's forward without ``flash_attn_func``'s autograd wrapper, and with its ``out=``."""
    from flash_attn.cute import interface
    out, lse, *_ = interface._flash_attn_fwd(q, k, v, **kwargs)
    return out, lse


def require_written(written: torch.Tensor, out: torch.Tensor, remedy: str) -> None:
    """Raise unless FA4 returned the ``out=`` tensor it was given (``out`` itself, not a copy in its own layout)."""
    if written.data_ptr() != out.data_ptr() or written.stride() != out.stride():
        raise RuntimeError(f"flash-attn-4's _flash_attn_fwd returned an output at {written.data_ptr():#x} "
                           f"{list(written.shape)} strides {written.stride()}, not the out= it was given (strides "
                           f"{out.stride()}); this version differs from the one measured: {remedy}")
