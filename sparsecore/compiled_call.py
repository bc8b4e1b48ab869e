"""A compiled kernel's call as one PyTorch custom op under ``torch.compile``, which records it and never traces it.

What :meth:`sparsecore.kernel.CompiledKernel.__call__` does before it launches cannot be traced: it chooses a
backend per input signature, lowers and uploads the mask at a signature's first call, may start a warm-up thread,
and reads shapes and host arrays. Traced by Dynamo it stopped on NumPy's ``setflags`` at a first call and, with
``fullgraph=True``, on a data-dependent guard after one (graph breaks otherwise). Under ``torch.compile``
(``torch.compiler.is_compiling()``) a kernel called with torch tensors therefore goes through
``torch.ops.sparsecore.kernel_attention`` instead; the op finds the kernel by its slot (held weakly, as the
diffusers op finds its handles: :mod:`sparsecore.integrations.diffusers.op`) and runs the eager call inside. The
slot travels as a 0-d CPU tensor, a graph input: a layer that holds a new kernel each step (a method's new mask)
runs the same graph (a Python int is a constant to Dynamo, guarded on: a recompile per mask, and under
``fullgraph=True`` an error at the recompile limit).

The op returns ``out`` contiguous ``[B, H, q_len, D_v]`` in q's dtype and ``lse`` float32 ``[B, H, q_len]`` (an
empty ``[0]`` tensor where none is asked for), the shapes and strides its fake implementation states. Like the
diffusers op it is inference-only: with inputs needing gradients, AOTAutograd's trace of its backward raises, at
compile time. So with such inputs a call runs outside the graph instead, as it runs eagerly, wherever one of the
kernel's backends keeps autograd's graph (``portable`` on a mask that drops unlisted blocks, a fallback even on
CUDA); the backend is chosen at the call, so this holds whichever one then runs (Triton's or FA4's backward raises,
as eagerly). It is not for CUDA graphs (tagged ``cudagraph_unsafe`` where PyTorch has the tag; it
raises inside a capture otherwise): each call decides on the host.
"""

from __future__ import annotations

import itertools
import weakref
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from sparsecore.inputs import check_return_lse, check_scale, check_scale_type
from sparsecore.ir.uploads import refuse_capture
from sparsecore.no_backward import wants_gradient

if TYPE_CHECKING:
    from .kernel import CompiledKernel

_KERNELS: "weakref.WeakValueDictionary[int, CompiledKernel]" = weakref.WeakValueDictionary()
_NEXT = itertools.count()
_NOT_IN_CUDA_GRAPHS = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


def register(kernel: "CompiledKernel") -> torch.Tensor:
    """A new slot for ``kernel`` (its own for its lifetime; the op holds it weakly), as a 0-d int64 CPU tensor."""
    slot = next(_NEXT)
    _KERNELS[slot] = kernel
    return torch.tensor(slot, dtype=torch.int64, device="cpu")     # not a default device (a GPU: a sync a call)


@torch.library.custom_op("sparsecore::kernel_attention", mutates_args=(), **_NOT_IN_CUDA_GRAPHS)
def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float], return_lse: bool,
                     slot: torch.Tensor, numpy_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``out, lse`` of the kernel in ``slot`` (see the module docstring). ``numpy_scale``: a NumPy scale as a 0-d CPU
    tensor of its dtype, given back to the eager call as a NumPy scalar (``scale`` is then None)."""
    refuse_capture(q.device, "a compiled sparsecore kernel")
    kernel = _KERNELS.get(int(slot))
    if kernel is None:
        raise RuntimeError("sparsecore: the kernel this compiled code calls was garbage-collected; keep a reference "
                           "to the kernel sparsecore.compile returned for as long as the compiled code runs")
    if numpy_scale is not None:
        scale = numpy_scale.numpy()[()]      # checked there as eagerly: a NaN's ValueError, np.True_'s TypeError
    found = kernel.eager_call(q, k, v, scale, return_lse)
    out, lse = found if return_lse else (found, q.new_empty(0, dtype=torch.float32))
    return out.contiguous(), lse.contiguous()


@kernel_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float], return_lse: bool,
      slot: torch.Tensor, numpy_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lse_shape = q.shape[:-1] if return_lse else (0,)
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(lse_shape, dtype=torch.float32)


def _no_backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor) -> None:
    raise NotImplementedError("a sparsecore kernel called under torch.compile is inference-only (no backward); run "
                              "the forward under torch.no_grad(), or call the kernel outside the compiled region")


kernel_attention.register_autograd(_no_backward, setup_context=lambda ctx, inputs, output: None)


def traced_call(kernel: "CompiledKernel", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Any,
                return_lse: Any) -> Any:
    """What :meth:`.CompiledKernel.__call__` does under ``torch.compile``: the op; or, with inputs needing gradients
    where one of the kernel's backends keeps them (``portable`` on a mask that drops unlisted blocks), the eager call
    outside the graph, whichever backend it then runs (a graph break, so not under ``fullgraph=True``). That k and v
    are tensors is checked here (the eager call's TypeError), and so are the types of ``scale`` and ``return_lse``,
    which the op's schema types; a scale's value is checked in the op, by the eager call (a traced scale may be
    symbolic; a NumPy one is traced as an array, so it travels as a tensor).
    """
    # inputs the op cannot take (Dynamo would trace a NumPy k as a tensor; a kernel of NumPy arrays, reference, gets
    # a tensor q): the eager call's TypeError
    if kernel.backend.capabilities.array_type != "torch" or not all(isinstance(t, torch.Tensor) for t in (k, v)):
        kernel._check_shape(q, k, v)
    if not isinstance(return_lse, bool):         # it decides what the call returns: checked while tracing
        _refuse_return_lse(return_lse)
    if wants_gradient(q, k, v) and kernel.differentiable:
        return _eager_outside_graph(kernel, q, k, v, scale, return_lse)
    numpy_scale = None
    if isinstance(scale, (np.generic, np.ndarray)):
        # Dynamo traces a NumPy scalar (1 / np.sqrt(D), np.float32(0.1)) as a 0-d array, whose float() is a
        # data-dependent value the op's float cannot take: it travels as a 0-d CPU tensor of its dtype, a graph input
        # (no recompile as it changes), and the op checks it as NumPy eagerly. Traced, a NumPy scalar and a 0-d array
        # look alike, so a 0-d array is taken here (eagerly refused); a larger one is refused as eagerly.
        if scale.ndim != 0:
            check_scale_type(scale)
        numpy_scale, scale = torch.as_tensor(scale, device="cpu"), None
    elif isinstance(scale, Fraction):     # (from torch 2.13 Dynamo traces float() of a Fraction)
        scale = float(scale)
    check_scale_type(scale, (torch.SymInt, torch.SymFloat))
    if type(scale) is int:      # one past float's range fails in the op's schema, naming nothing; one that changes
        scale = check_scale(scale, 1)     # between calls is traced as a symbolic int (checked as traced code can)
    out, lse = torch.ops.sparsecore.kernel_attention(q, k, v, scale, return_lse, kernel.slot, numpy_scale)
    return (out, lse) if return_lse else out


def _refuse_return_lse(return_lse: Any) -> None:
    """The eager call's TypeError for a ``return_lse`` that is not a bool. While tracing, its message is made as Dynamo
    can trace it (it traced neither a type's module nor a tensor's repr: under fullgraph=True its error named neither
    the argument nor the remedy); outside (Dynamo's fallback to Python after such a break) it is the eager one."""
    if not torch.compiler.is_compiling():
        check_return_lse(return_lse)
    got = "a NumPy value" if isinstance(return_lse, np.ndarray) else type(return_lse).__name__  # NumPy scalars too
    raise TypeError(f"return_lse: expected a bool (True or False), got {got}; pass bool(return_lse)")


def _eager_outside_graph(kernel: "CompiledKernel", *call: Any) -> Any:
    """The eager call, run outside the graph (a graph break). ``torch.compiler.disable`` imports ``torch._dynamo``
    (about 1 s): it is applied at the first such call, under torch.compile (which has it already), not when
    ``import sparsecore`` loads this module."""
    return _made_once(_OUTSIDE_GRAPH, _eager_call,
                      "a sparsecore kernel called on inputs that need gradients, where one of its backends keeps them "
                      "(portable, on a mask that drops unlisted blocks), runs outside the graph; under fullgraph=True "
                      "run it under torch.no_grad(), with detached inputs, or without fullgraph")(kernel, *call)


def _eager_call(kernel: "CompiledKernel", *call: Any) -> Any:
    return kernel.eager_call(*call)


_OUTSIDE_GRAPH: list[Any] = []                   # the disabled _eager_call, made at first use


def outside_graph(compile: Any, *args: Any, **kwargs: Any) -> "CompiledKernel":
    """``sparsecore.compile`` called under ``torch.compile`` (a layer compiling each step's mask in its forward): run
    eagerly, outside the graph (a graph break), as Dynamo cannot trace it (hashing the mask's lists, checking the
    backends on its blocks); the kernel it returns is then called as the op. Made at first use, as above."""
    return _made_once(_COMPILE_OUTSIDE_GRAPH, compile,
                      "sparsecore.compile(mask) runs outside the graph (it hashes and checks the mask on the host); "
                      "under fullgraph=True compile the mask outside the compiled region and call the kernel it "
                      "returns inside, or compile without fullgraph")(*args, **kwargs)


_COMPILE_OUTSIDE_GRAPH: list[Any] = []           # the disabled sparsecore.compile, made at first use


def _made_once(store: list[Any], fn: Any, reason: str) -> Any:
    """``torch.compiler.disable(fn, reason=reason)``, made at the first call and kept in ``store``. That first call is
    traced: Dynamo does not trace ``torch.compiler.disable`` itself (a graph break naming only "a function marked as
    skipped", which fullgraph=True raised in a fresh process), so it breaks the graph with ``reason`` first."""
    if not store:
        if torch.compiler.is_compiling() and _BREAK_TAKES_MESSAGE:
            torch._dynamo.graph_break(msg=reason)     # as a keyword: Dynamo reports only that
        elif torch.compiler.is_compiling():
            torch._dynamo.graph_break()
        store.append(torch.compiler.disable(fn, reason=reason))
    return store[0]


# graph_break(msg=) is checked on torch 2.11 (the H100 of 2026-12-06: its Dynamo reports "Message: None" for a bare
# graph_break()) and 2.13; an older Dynamo's graph_break may take no argument (a TypeError when the break runs the call
# eagerly), so there the break names no reason (a fullgraph=True error as before, no remedy)
_BREAK_TAKES_MESSAGE = torch.__version__ >= (2, 11)
