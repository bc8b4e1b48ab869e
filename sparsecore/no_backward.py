"""Outputs whose backward raises: the kernels are inference-only.

The lowerings have no backward. Called with inputs that require gradients, their outputs would
carry none (Triton's, FlashInfer's, FA4's dense forward: a gradient silently missing) or FA4's own
autograd (``flash_attn_func``'s backward runs without the block-sparse tensors: dense over its
tiles, silently wrong). :func:`inference_only` runs a computation as usual and, where its inputs
want gradients, returns its outputs with a backward that raises, naming what ran. A backend whose
runs are differentiable torch ops (``Backend.differentiable``: ``portable``) keeps its gradients on
masks that drop unlisted blocks (an approximation merges in place, which autograd cannot follow).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def wants_gradient(*inputs: Any) -> bool:
    """Whether autograd would record a graph through ``inputs`` (grad mode on, one of them requiring grad)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


def inference_only(what: str, compute: Callable[[], Any], *inputs: Any) -> Any:
    """``compute()`` (a tensor or a tuple of tensors and ``None``); where ``inputs`` want gradients its outputs
    come detached from whatever autograd ``compute`` recorded, with a backward that raises naming ``what``."""
    if not wants_gradient(*inputs):
        return compute()
    return _NoBackward.apply(what, compute, *inputs)


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, what: str, compute: Callable[[], Any], *inputs: Any) -> Any:
        ctx.what = what
        result = compute()
        if isinstance(result, tuple):
            return tuple(_detached(r) for r in result)
        return _detached(result)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise NotImplementedError(
            f"sparsecore's kernels are inference-only: {ctx.what} has no backward pass, so no gradient reaches q, "
            "k, v. Run the forward under torch.no_grad() or torch.inference_mode(), or detach q, k, v; to train, "
            "use dense attention (or backend='portable' on a mask that drops unlisted blocks: its torch ops have "
            "gradients)")


def _detached(value: Any) -> Any:
    """A tensor output without its view history (an output that is a view could not then be changed in place)."""
    return value.detach() if isinstance(value, torch.Tensor) else value
