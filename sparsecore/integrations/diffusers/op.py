"""sparsecore's attention for diffusers processors as one PyTorch custom op, opaque to ``torch.compile``.

A processor computes q, k, v with ordinary (traceable) tensor ops and hands them to
``torch.ops.sparsecore.diffusers_attention``: everything data-dependent (the step's decision,
mask planning on the device, the kernel's plan and launch, text lengths, the Ulysses
all-to-alls) happens inside the op, which Dynamo records as one call and never traces into.
Compiled transformers (diffusers' ``compile_repeated_blocks(fullgraph=True)``,
``torch.compile(transformer)``) therefore run with no graph break in the blocks, and no
recompilation across steps: masks change inside the op, not in anything a guard watches.

The op's arguments are the processor's tensors and one int, the model's slot: the same for
every layer and for every handle applied to that model (Dynamo specializes on ints, so
re-applying sparsecore to a compiled model compiles nothing again). The layer is the call's
place in the forward, counted by the handle, so a compiled block's code is shared by every
layer. The fake implementation gives the output's shape and dtype, ``[B, S, H, D_v]`` like the
query; the real one returns a new contiguous tensor of that layout.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .handle import SparseAttentionHandle

_SLOTS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_HANDLES: "weakref.WeakValueDictionary[int, SparseAttentionHandle]" = weakref.WeakValueDictionary()


def register(handle: "SparseAttentionHandle", model: torch.nn.Module) -> int:
    """The slot the op uses to find ``handle``: one per model, kept across handles (weak references)."""
    slot = _SLOTS.setdefault(model, max(_SLOTS.values(), default=-1) + 1)
    _HANDLES[slot] = handle
    return slot


@torch.library.custom_op("sparsecore::diffusers_attention", mutates_args=())
def diffusers_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_mask: Optional[torch.Tensor],
                        handle: int) -> torch.Tensor:
    """Self-attention ``[B, S, H, D]`` of the next layer of ``handle``'s model (see the module docstring)."""
    found = _HANDLES.get(handle)
    if found is None:
        raise RuntimeError("sparsecore: this attention's handle was removed or garbage-collected while the compiled "
                           "model still calls it; call apply() again (or compile after apply)")
    return found.attend_next(query, key, value, text_mask).contiguous()


@diffusers_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_mask: Optional[torch.Tensor],
      handle: int) -> torch.Tensor:
    return query.new_empty(*query.shape[:3], value.shape[3])
