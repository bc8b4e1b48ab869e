"""What a Triton launch may use of a GPU's shared memory, and the pipeline depth that fits it.

Triton refuses a launch whose compiled kernel needs more shared memory than the device allows a block
(``OutOfResources: shared memory``). The tuned tiles come from an H200 (227 KB a block); an A100 allows 163 KB,
an A10, RTX 3090, RTX 4090, L40S or RTX 5090 99 KB. Compiled for sm86/sm89 with Triton 3.6, the block-sparse
kernel's 128 x 128 tiles at head dim 128 need 163,840 bytes at three stages and 98,304 at two
(``tests/test_triton_targets.py`` compiles every kernel of the library for those GPUs on CPU). So a launch asks
:func:`fitting_stages` for the deepest pipeline that fits, compiling (not launching) each candidate: Triton keeps
the compiled kernel, and the launch that follows finds it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def shared_memory_limit() -> int:
    """Bytes of shared memory a block may use on the current CUDA device (Triton launches there, and checks a
    launch against this figure)."""
    import triton
    return _shared_memory_of(triton.runtime.driver.active.get_current_device())


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
