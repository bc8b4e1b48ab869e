"""What a Triton launch may use of a GPU's shared memory, and the pipeline depth that fits it.

Triton refuses a launch whose compiled kernel needs more shared memory than the device allows a block
(``OutOfResources: shared memory``). The tuned tiles come from an H200 (227 KB a block); an A100 allows 163 KB,
an A10, RTX 3090, RTX 4090, L40S or RTX 5090 99 KB. Compiled for sm86/sm89 with Triton 3.6, the block-sparse
kernel's 128 x 128 tiles at head dim 128 need 163,840 bytes at three stages and 98,304 at two
(``tests/test_triton_targets.py`` compiles every kernel of the library for those GPUs on CPU). So a launch asks
:func:`fitting_stages` for the deepest pipeline that fits, compiling (not launching) each candidate: Triton keeps
the compiled kernel, and the launch that follows finds it.

The approximation pass of PASA's masks cannot always shrink enough: :data:`APPROXIMATION_SHARED_MEMORY` records what its
smallest tiles need where that exceeds 99 KB, and selection (``Capabilities.unselected_shared_memory``, compared with
:func:`device_shared_memory`) runs such inputs on another backend there.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

# (unselected kind, dtype, head dim, bytes): shared memory a block the approximation pass needs at its smallest
# tiles (one stage, group by group) at the default tiles, where that is over the 101,376 bytes of sm86 / sm89 GPUs.
# Compiled for sm89 with Triton 3.6 (tests/test_triton_targets.py's approximation case, 64 blocks of 64 tokens; groups
# of 3, 8 and 32 blocks alike). A grouped mask of one group needs what the global kind does (Triton specializes a group
# count of 1: 100,096 bytes in float16), and selection looks it up as that kind. Every other kind, dtype and head
# dim of the pass fits 99 KB (bfloat16: 90,752 bytes at most; float16 at head dim 128: 99,584 zeroth; float32
# zeroth: 98,816).
APPROXIMATION_SHARED_MEMORY = frozenset({
    ("grouped-first-order", "float16", 128, 163_840),
    ("grouped-first-order", "float32", 128, 131_072),
    ("global-first-order", "float32", 128, 131_072),
})


def shared_memory_limit() -> int:
    """Bytes of shared memory a block may use on the current CUDA device (Triton launches there, and checks a
    launch against this figure)."""
    import triton
    return _shared_memory_of(triton.runtime.driver.active.get_current_device())


def device_shared_memory(device: str) -> int | None:
    """Bytes of shared memory a block may use (opt-in) on CUDA ``device`` (``"cuda"``: the current one, ``"cuda:N"``),
    queried once per device; None where CUDA is not available (Triton's CPU interpreter) or ``device`` is not CUDA."""
    import torch
    if device.split(":")[0] != "cuda" or not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    return _optin_of(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _optin_of(index: int) -> int:
    import torch
    optin = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    return int(optin) if optin is not None else _shared_memory_of(index)      # older torch: Triton's figure


@functools.lru_cache(maxsize=None)
def _shared_memory_of(index: int) -> int:
    import triton
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def fitting_stages(compile_at: Callable[[int], Any], deepest: int, what: str) -> int | None:
    """The largest stage count from ``deepest`` down to 1 whose kernel, compiled by ``compile_at(stages)``, fits the
    current device's shared memory; None where Triton gives no compiled kernel to read (a JIT hook). An asynchronous
    compile (``triton.AsyncCompileMode``) is waited for.

    Raises:
        RuntimeError: not even one stage fits, naming ``what``, the bytes each stage count needs and the limit.
    """
    limit, tried = shared_memory_limit(), []
    for stages in range(deepest, 0, -1):
        compiled = compile_at(stages)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled      # a FutureKernel
        needed = getattr(getattr(compiled, "metadata", None), "shared", None)
        if needed is None:
            return None
        if needed <= limit:
            return stages
        tried.append(f"{stages} stage(s): {needed} bytes")
    raise RuntimeError(f"{what}: no pipeline depth fits the {limit} bytes of shared memory this GPU allows a block "
                       f"({'; '.join(tried)}); pass smaller tiles (the backend's options) or run on another backend")
