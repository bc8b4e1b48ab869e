"""Compare a backend's (out, lse) with the oracle's, with the per-dtype tolerances."""

from __future__ import annotations

import numpy as np
import torch

from oracle import dense_attention, expand_to_tokens
from targets import Target, default_scale, to_float64
from tolerances import LSE_ABS, OUT_REL, ROW_REL

import sparsecore


def in_model_layout(args):
    """Torch ``[B, H, L, D]`` inputs as views of ``[B, L, H, D]`` memory (how the diffusers integration hands
    them to a kernel); NumPy inputs as they are."""
    return [a.transpose(1, 2).contiguous().transpose(1, 2) if isinstance(a, torch.Tensor) else a for a in args]


def run_and_compare(target: Target, mask, q, k, v, scale=None, device_held: bool = False,
                    model_layout: bool = False) -> None:
    """Compile ``mask`` for ``target``, run it on q, k, v (float64 numpy), check it against the oracle.

    ``device_held``: compile the mask with its lists as torch tensors on the tensors' device, as
    methods build them (the oracle reads the host mask either way). ``model_layout``: the inputs as
    strided views (:func:`in_model_layout`).
    """
    torch_device = target.tensor_device if target.capabilities.array_type == "torch" else "cpu"
    compiled = mask.to(torch_device) if device_held else mask
    kernel = sparsecore.compile(compiled, device=target.device, backend=target.backend)
    args, (q64, k64, v64) = target.cast(q, k, v)
    args = in_model_layout(args) if model_layout else args
    want_lse = target.capabilities.lse
    result = kernel(*args, scale=scale, return_lse=want_lse)
    out, lse = result if want_lse else (result, None)
    assert lse is None or str(lse.dtype).endswith("float32"), f"LSE must be float32, got {lse.dtype}"
    assert out.dtype == args[0].dtype, f"output dtype {out.dtype}, expected the input's {args[0].dtype}"
    ref_out, ref_lse = dense_attention(q64, k64, v64, expand_to_tokens(mask), default_scale(q.shape[-1], scale))
    assert_matches(target.dtype, to_float64(out), None if lse is None else to_float64(lse), ref_out, ref_lse)
    if want_lse:                                  # the default call, without the LSE, may take another path
        assert_matches(target.dtype, to_float64(kernel(*args, scale=scale)), None, ref_out, ref_lse)


def assert_matches(dtype: str, out: np.ndarray, lse: np.ndarray | None, ref_out: np.ndarray,
                   ref_lse: np.ndarray) -> None:
    assert out.shape == ref_out.shape, f"output shape {out.shape}, expected {ref_out.shape}"
    assert np.isfinite(out).all(), "output has NaN or inf"
    empty = ~np.isfinite(ref_lse)
    assert (out[empty] == 0).all(), f"rows that keep no key must give exactly 0; max |out| there {abs(out[empty]).max()}"
    rel = np.linalg.norm(out - ref_out) / max(np.linalg.norm(ref_out), 1e-300)
    assert rel <= OUT_REL[dtype], f"relative L2 error {rel:.3g} > {OUT_REL[dtype]:.1g} ({dtype})"
    # one wrong row among thousands hides in the whole output's error: each row against its own norm (or the
    # typical row's, for rows near 0)
    row_norms = np.linalg.norm(ref_out, axis=-1)
    floor = max(float(np.sqrt((row_norms ** 2).mean())), 1e-300)
    row_rel = np.linalg.norm(out - ref_out, axis=-1) / np.maximum(row_norms, floor)
    worst = row_rel.max()
    assert worst <= ROW_REL[dtype], f"a row's relative error {worst:.3g} > {ROW_REL[dtype]:.1g} ({dtype})"
    if lse is None:
        return
    assert lse.shape == ref_lse.shape, f"lse shape {lse.shape}, expected {ref_lse.shape}"
    assert (np.isneginf(lse) == empty).all(), "LSE must be -inf exactly on rows that keep no key"
    if (~empty).any():
        # the LSE is float32, so its error grows with its magnitude: compare relative to max(1, |lse|)
        err = (abs(lse[~empty] - ref_lse[~empty]) / np.maximum(1.0, abs(ref_lse[~empty]))).max()
        assert err <= LSE_ABS[dtype], f"LSE error {err:.3g} > {LSE_ABS[dtype]:.1g} ({dtype}, relative to max(1, |lse|))"
