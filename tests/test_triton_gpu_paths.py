"""The Triton lowering's GPU-default paths, run on CPU through Triton's interpreter against the float64 oracle.

Off a GPU the lowering takes the interpreter's configuration (pointer loads, 64 x 16 approximation tiles), so the
paths an H100/H200 takes by default would run only on a GPU: the exact kernel's TMA loads (fp16/bf16 on SM90) and the
approximation pass's wider tiles (several groups a tile, 32-block words). Here both are forced; the interpreter runs
them on CPU tensors (fp16 and fp32: its bf16 products are wrong). Skips with the backend's reason elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oracle import dense_attention, expand_to_tokens
from oracle_unselected import approximated_attention

import sparsecore
from sparsecore import BlockMask
from sparsecore.backends.cuda.approximation_launch import ApproximationConfig
from sparsecore.backends.cuda.triton_config import TritonOptions
from sparsecore.backends.cuda.triton_launch import TritonLaunch
from sparsecore.ir import Unselected


def _mask(q_offsets, kv_offsets, heads: int, seed: int, kind: str = "drop") -> BlockMask:
    keep = np.random.default_rng(seed).random((heads, len(q_offsets) - 1, len(kv_offsets) - 1)) < 0.5
    keep[0, 0] = False                                                   # an empty row
    keep[-1, -1] = True                                                  # a full row
    mask = BlockMask.from_lists([[np.flatnonzero(row) for row in head] for head in keep], np.asarray(q_offsets),
                                np.asarray(kv_offsets))
    return mask if kind == "drop" else BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr,
                                                 mask.indices, unselected=Unselected.parse(kind))


def _unaligned(shape, gen) -> torch.Tensor:
    """A contiguous fp16 tensor starting 2 bytes past a 16-byte boundary (a view into a larger buffer)."""
    flat = torch.randn(int(np.prod(shape)) + 8, generator=gen).half()
    shift = (-(flat.data_ptr() // 2) + 1) % 8                            # elements to the first 2-mod-16 address
    view = flat[shift:shift + int(np.prod(shape))].view(shape)
    assert view.is_contiguous() and view.data_ptr() % 16 == 2
    return view


@pytest.mark.parametrize("tile", [(16, 16), (64, 64), (128, 128), (16, 128)])
def test_the_tma_path_matches_the_oracle(triton_device, tile):
    """Ragged blocks (short last, q_len != kv_len), GQA 2:1, batch 2, an empty and a full row; q contiguous but not
    16-byte aligned, which TMA cannot take directly (Triton asserted; the descriptor now takes an aligned copy)."""
    mask = _mask([0, 50, 117, 150], [0, 64, 100, 200, 230], 4, seed=sum(tile))
    gen = torch.Generator().manual_seed(sum(tile))
    q = _unaligned((2, 4, 150, 16), gen)
    k, v = (torch.randn(2, 2, 230, 16, generator=gen).half() for _ in range(2))
    kernel = sparsecore.compile(mask, "cuda", backend="triton", cache=False, warmup="wait",
                                block_m=tile[0], block_n=tile[1], use_tma=True)
    out, lse = kernel(q.to(triton_device), k.to(triton_device), v.to(triton_device), return_lse=True)
    ref_out, ref_lse = dense_attention(*(t.double().numpy() for t in (q, k, v)), expand_to_tokens(mask), 0.25)
    np.testing.assert_allclose(out.double().cpu().numpy(), ref_out, atol=3e-3)
    np.testing.assert_array_equal(np.isneginf(lse.cpu().numpy()), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse.double().cpu().numpy()[finite], ref_lse[finite], atol=1e-3)


@pytest.mark.parametrize("blocks", [100, 70])
@pytest.mark.parametrize("config", [ApproximationConfig(128, 32, 8, 3), ApproximationConfig(32, 64, 4, 1),
                                    ApproximationConfig(16, 128, 4, 1)], ids=lambda c: f"{c.block_m}x{c.block_n}")
@pytest.mark.parametrize("kind", ["zeroth", "global-first-order", "grouped-first-order:8", "grouped-first-order:32",
                                  "grouped-first-order:7"])
def test_the_gpu_approximation_tiles_match_the_oracle(triton_device, config, kind, blocks):
    """The pass's GPU tiles: 32-128 blocks a tile, so 1-16 whole groups a tile or the walk group by group, over 100
    or 70 ragged key blocks (several 32-block words, the last one part full)."""
    rng = np.random.default_rng(11)
    kv_offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 5, blocks))])
    mask = _mask([0, 50, 130, 200], kv_offsets, 2, seed=11, kind=kind)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 200, 16, generator=gen)
    k, v = torch.randn(1, 1, int(kv_offsets[-1]), 16, generator=gen) + 0.2, torch.randn(1, 1, int(kv_offsets[-1]), 16,
                                                                                        generator=gen)
    launch = TritonLaunch(mask.to(triton_device), TritonOptions())
    launch.approximation.config = config
    out, lse = launch(*(t.to(triton_device) for t in (q, k, v)), 0.25, True)
    ref_out, ref_lse = approximated_attention(*(t.double().numpy() for t in (q, k, v)), mask, 0.25)
    np.testing.assert_allclose(out.double().cpu().numpy(), ref_out, atol=1e-4)
    np.testing.assert_allclose(lse.double().cpu().numpy(), ref_lse, atol=1e-4)
