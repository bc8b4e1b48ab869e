"""The CUDA row-wise top-k of the planners (:class:`sparsecore.registry.RowTopOp`), a Triton kernel.

PASA's selection at Wan 6x is a ``[12, 2950, 2950]`` score map, its Gumbel noise and a top-k of
442 per row; as torch ops that is about twenty elementwise passes for the noise, ``topk``, a sort
of the kept ids and their copies. :mod:`.row_top_kernel` does it in one pass over the scores, one
program per row. Triton is imported only when it runs; under ``TRITON_INTERPRET=1`` it also runs
on CPU tensors inside the Triton backend's emulator, which is how CI tests it. Offered through
``TritonBackend.row_top``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from . import interpreter

MAX_COLUMNS = 16384          # a row's scores are held by one program (64 KiB of float32)


def supports(scores: Any, k: int) -> str | None:
    """None if the kernel takes ``scores`` float32 ``[H, R, C]`` and ``k``, else why not (the planners use torch)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or scores.dtype != torch.float32:
        return "scores: expected a float32 tensor [H, R, C]"
    if scores.shape[2] > MAX_COLUMNS:
        return f"{scores.shape[2]} columns: a row must fit one program (at most {MAX_COLUMNS})"
    if scores.shape[1] * scores.shape[2] >= 1 << 31:
        return "rows x columns must fit the noise's 32-bit counter"
    if not 1 <= k <= scores.shape[2]:
        return f"k = {k} is not within 1..{scores.shape[2]}"
    if not interpreter.active() and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return interpreter.tensor_device_problem("cuda", scores.device.type)


def run(scores: torch.Tensor, k: int, noise: Any = None) -> torch.Tensor:
    """Column ids int32 ``[H, R, k]``, ascending, of each row's ``k`` largest ``scores + noise`` (see the registry)."""
    import triton
    from .row_top_kernel import row_top_kernel
    heads, rows, cols = scores.shape
    if noise is not None and noise.keys.numel() not in (1, heads):       # one key: every head's, as sample() reads it
        raise ValueError(f"noise: expected one key or one per head ({heads}), got {noise.keys.numel()}; make the noise "
                         f"for these heads (noise.head_keys)")
    out = torch.empty(heads, rows, k, dtype=torch.int32, device=scores.device)
    if out.numel() == 0:
        return out
    block = max(16, triton.next_power_of_2(cols))
    keys = out if noise is None else noise.keys.to(device=scores.device, dtype=torch.int32).reshape(-1).expand(heads) \
        .contiguous()                                                                       # out: never read
    row_top_kernel[(rows, heads)](scores, keys, out, cols, k, 0.0 if noise is None else -float(noise.scale),
                                  scores.stride(0), scores.stride(1), scores.stride(2), out.stride(0), out.stride(1),
                                  HAS_NOISE=noise is not None, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return out

