"""sparsecore's attention for diffusers processors as one PyTorch custom op, opaque to ``torch.compile``.

A processor computes q, k, v with ordinary (traceable) tensor ops and hands them to
``torch.ops.sparsecore.diffusers_attention``: everything data-dependent (the step's decision,
mask planning on the device, the kernel's plan and launch, text lengths, the Ulysses
all-to-alls) happens inside the op, which Dynamo records as one call and never traces into.
Compiled transformers (diffusers' ``compile_repeated_blocks(fullgraph=True)``,
``torch.compile(transformer)``) therefore run with no graph break in the blocks, and no
recompilation across steps: masks change inside the op, not in anything a guard watches.

The op's arguments are the processor's tensors, the model's slot (the same for every layer and
for every handle applied to that model) and the processor's layer. Both travel as 0-d CPU tensors,
graph inputs (as :mod:`sparsecore.compiled_call`'s): Dynamo guards on a Python int's value, so an
int slot made every other model of a class (a reloaded model, Wan 2.2's second expert) compile the
shared block code again, and the ninth hit the recompile limit (an error under ``fullgraph=True``);
an int layer would do the same for every layer. So a compiled block's code is shared by every layer
and every model. A layer names itself rather than being counted, so a forward that skips blocks
(diffusers' block caches, LTX-2's fully perturbed layers) leaves the others their own masks.

CUDA graphs. A graph replaying the op would repeat one call's decisions: from PyTorch 2.8 it is tagged
``cudagraph_unsafe`` (inductor's ``mode="reduce-overhead"`` cuts its CUDA graphs around it, or skips
them), and it raises inside a capture (:func:`sparsecore.ir.uploads.refuse_capture`) where the tag
does not apply (earlier versions, ``torch.cuda.graph``).

Layout. The op's output is ``[B, S, H, D_v]`` in head-major memory (a transposed view of
``[B, H, S, D_v]``, what the kernels write), so it costs no copy; the fake implementation gives the
same shape and strides. Its inputs take any strides; under ``torch.compile`` the processors hand it
head-major ones (:func:`head_major`), so inductor writes RoPE's output in the kernels' layout
directly, where a contiguous copy inside the op would add a fourth q, k, v-sized tensor to the
peak (0.15 GiB above dense at Wan 2.1 6x, compiled).
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Optional

import torch

from sparsecore.ir.uploads import refuse_capture
from sparsecore.launch_device import on_device_of

if TYPE_CHECKING:
    from .handle import SparseAttentionHandle

_SLOTS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_HANDLES: "weakref.WeakValueDictionary[int, SparseAttentionHandle]" = weakref.WeakValueDictionary()
_SLOT_LOCK = threading.Lock()     # apply() from several threads (a model a device): each new model its own slot


def register(handle: "SparseAttentionHandle", model: torch.nn.Module) -> torch.Tensor:
    """The slot the op uses to find ``handle`` (one per model, kept across handles; weak references), as a 0-d int64
    CPU tensor."""
    with _SLOT_LOCK:
        slot = _SLOTS.get(model)
        if slot is None:
            slot = _SLOTS[model] = max(_SLOTS.values(), default=-1) + 1
        _HANDLES[slot] = handle
    return torch.tensor(slot, dtype=torch.int64, device="cpu")     # not a default device (a GPU: a sync a call)


# The op decides on the host at each call (the step, the layer, the mask) and copies per-call plans: a CUDA graph
# replay would repeat one call's decisions. The tag (PyTorch 2.8 on) keeps inductor's CUDA graphs
# (mode="reduce-overhead", "max-autotune") off it: they are cut around the op (graph partitioning, the default
# from 2.9) or skipped. Earlier versions get the op's own check instead (it raises inside a capture).
_NOT_IN_CUDA_GRAPHS = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


@torch.library.custom_op("sparsecore::diffusers_attention", mutates_args=(), **_NOT_IN_CUDA_GRAPHS)
def diffusers_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_mask: Optional[torch.Tensor],
                        handle: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """Self-attention ``[B, S, H, D]`` of ``layer`` of ``handle``'s model (see the module docstring)."""
    refuse_capture(query.device, "a diffusers layer's attention")
    found = _HANDLES.get(int(handle))
    if found is None:
        raise RuntimeError("sparsecore: this attention's handle was removed or garbage-collected while the compiled "
                           "model still calls it; call apply() again (or compile after apply)")
    with on_device_of(query):               # the planners' and kernels' Triton launches go to the current device
        return head_major(found.attend(int(layer), query, key, value, text_mask))


@diffusers_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_mask: Optional[torch.Tensor],
      handle: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    batch, seq_len, heads, _ = query.shape
    return query.new_empty(batch, heads, seq_len, value.shape[3]).transpose(1, 2)


INFERENCE_ONLY = ("sparsecore's attention kernels are inference-only (no backward); run the forward under "
                  "torch.no_grad(), or call handle.remove() to train with diffusers' attention")


def _no_backward(ctx: Any, grad: torch.Tensor) -> None:
    raise NotImplementedError(INFERENCE_ONLY)


diffusers_attention.register_autograd(_no_backward, setup_context=lambda ctx, inputs, output: None)


def head_major(t: torch.Tensor) -> torch.Tensor:
    """``t [B, S, H, D]`` with ``[B, H, S, D]`` memory: itself if it has it already, else one copy."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)
