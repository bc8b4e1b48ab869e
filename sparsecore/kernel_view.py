"""A cached kernel seen through the caller's own mask.

``compile`` finds a host mask's kernel by the mask's fingerprint (:mod:`sparsecore.kernel_cache`), which leaves out
``meta`` and ``budgets``: they do not change what a kernel computes, so a pattern that recurs with a new label (each
step's method, layer, step number) lowers nothing again. The cached kernel's ``mask`` is the first mask compiled,
though, so a caller who reads ``kernel.mask.meta`` (or ``.budgets``) must get a kernel bound to its own mask: a
:class:`BoundKernel`, which shares the cached kernel's choices, lowered plans and warm-ups (it calls that kernel)
and reports the caller's mask. The mask holds it weakly, as it holds a device mask's kernels, so compiling the
same mask again returns the same object while the caller keeps it.
"""

from __future__ import annotations

from typing import Any, Hashable

from sparsecore.ir import BlockMask

from .kernel import CompiledKernel


class BoundKernel(CompiledKernel):
    """``shared`` (a cached kernel of an equal pattern) with ``mask`` as its mask: calls, choices and plans are
    ``shared``'s; every attribute but ``mask`` (``device``, ``backend``, ``warmup``, ``slot``, ...) is read from and
    written to it, as the calls that use them are its calls."""

    def __init__(self, shared: CompiledKernel, mask: BlockMask) -> None:   # no state of its own to set up
        object.__setattr__(self, "_shared", shared)
        object.__setattr__(self, "mask", mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "mask":
            object.__setattr__(self, name, value)
        else:
            setattr(self._shared, name, value)

    def __call__(self, q: Any, k: Any, v: Any, scale: float | None = None, return_lse: bool = False) -> Any:
        return self._shared(q, k, v, scale, return_lse)

    def eager_call(self, q: Any, k: Any, v: Any, scale: float | None = None, return_lse: bool = False) -> Any:
        return self._shared.eager_call(q, k, v, scale, return_lse)

    def prepare(self, q: Any, k: Any, v: Any, scale: float | None = None, return_lse: bool = False) -> None:
        self._shared.prepare(q, k, v, scale, return_lse)

    def keep_plans_on_host(self) -> None:
        self._shared.keep_plans_on_host()

    def wait_for_warmups(self, timeout: float | None = None) -> bool:
        return self._shared.wait_for_warmups(timeout)


def bound_to(cached: CompiledKernel, mask: BlockMask, key: Hashable) -> CompiledKernel:
    """The kernel ``compile`` returns for host ``mask`` whose fingerprint found ``cached``: ``cached`` itself where
    the masks are equal (meta and budgets too: O(heads) and the meta's text), else ``mask``'s :class:`BoundKernel`
    (kept weakly by ``mask`` under ``key``, made anew where the cache has since dropped the kernel it shared: it
    would keep a second copy of the plans outside the cache's bound)."""
    if cached.mask is mask or cached.mask == mask:
        return cached
    bound = mask.compiled_kernels.get(key)
    if bound is None or bound._shared is not cached:
        bound = mask.compiled_kernels[key] = BoundKernel(cached, mask)
    return bound
