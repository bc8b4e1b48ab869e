"""The property suite: every registered backend, on every device it declares, equals dense attention.

A backend joins by registering. Targets that cannot run here skip with the
backend's own reason; named cases a backend cannot take skip with the unmet
capability. Everything else is compared with the float64 oracle in ``oracle.py``.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checks import run_and_compare
from strategies import AttentionCase, attention_cases
from targets import all_targets

from sparsecore import BlockMask, VideoGeometry
from sparsecore.methods import pasa

TARGETS = all_targets()


@pytest.fixture(params=TARGETS, ids=[t.id for t in TARGETS])
def target(request):
    request.node.user_properties.append(("target", request.param.matrix_row))
    with request.param.running() as t:
        yield t


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture only picks the target
@given(data=st.data())
def test_generated_masks_match_dense_oracle(target, data):
    case = data.draw(attention_cases(target.capabilities), label="case")
    device_held = data.draw(st.booleans(), label="lists held as device tensors")
    model_layout = data.draw(st.booleans(), label="q, k, v as views of [B, L, H, D]")
    run_and_compare(target, case.mask, *case.inputs(), scale=case.scale, device_held=device_held,
                    model_layout=model_layout)


def _frames(num_frames: int, frame: int, text: int) -> np.ndarray:
    """Frame-sized blocks (a scaled-down 1560-token latent frame) and a trailing text block."""
    bounds = list(range(0, num_frames * frame + 1, frame))
    return np.array(bounds + ([bounds[-1] + text] if text else []), dtype=np.int64)


def _local_window(offsets: np.ndarray, num_heads: int, width: int) -> BlockMask:
    n = len(offsets) - 1
    rows = [[range(max(0, i - width), min(n, i + width + 1)) for i in range(n)] for _ in range(num_heads)]
    return BlockMask.from_lists(rows, offsets, offsets)


def _random(num_heads: int, q_len: int, kv_len: int, block: int, density: float, seed: int) -> BlockMask:
    rng = np.random.default_rng(seed)
    shape = (num_heads, -(-q_len // block), -(-kv_len // block))
    return BlockMask.from_dense(rng.random(shape) < density, q_len, kv_len, block)


def _empty_rows_and_head() -> BlockMask:
    dense = np.random.default_rng(3).random((3, 5, 5)) < 0.5
    dense[0, 2] = False        # one empty row
    dense[1] = False           # one head that attends to nothing
    dense[2] = True            # one full head
    return BlockMask.from_dense(dense, 80, 80, 16)


def _video_then_text(video: int, text: int, block: int, num_heads: int, seed: int) -> BlockMask:
    """A joint sequence's layout (HunyuanVideo 1.5): ``block``-token video blocks whose short last one sits
    inside, then ``block``-token text blocks; random rows."""
    offsets = np.concatenate([BlockMask.uniform_offsets(video, block),
                              video + BlockMask.uniform_offsets(text, block)[1:]])
    n = len(offsets) - 1
    keep = np.random.default_rng(seed).random((num_heads, n, n)) < 0.5
    return BlockMask.from_lists([[np.flatnonzero(row) for row in head] for head in keep], offsets, offsets)


def _frame_causal_pasa() -> BlockMask:
    """PASA's plan for a frame-causal geometry (causal blocks of 3 frames of 72 tokens, 64-token blocks restarting
    at each, so blocks of 64 and 8 tokens): rows keeping different counts, ranked on random pooled scores."""
    geometry = VideoGeometry(12, 8, 9, causal_frames=3)
    rng = torch.Generator().manual_seed(12)
    q, k = (torch.randn(1, heads, geometry.tokens, 16, generator=rng) for heads in (4, 2))
    return pasa.plan(geometry, 4, step=30, layer=1, q=q, k=k, block_size=64, approximation="drop").to_host()


NAMED_CASES = {
    # name: (case, why it is here)
    "frame_blocks_with_text": AttentionCase(_local_window(_frames(6, 39, 13), 4, 1), 1, 2, 32, 11, None),
    "short_last_block": AttentionCase(_random(2, 100, 100, 32, 0.5, 1), 2, 2, 16, 12, None),
    "empty_rows_and_empty_head": AttentionCase(_empty_rows_and_head(), 1, 3, 16, 13, None),
    "gqa_4_to_1": AttentionCase(_random(8, 96, 96, 32, 0.4, 2), 1, 2, 32, 14, None),
    "gqa_2_to_1_q_len_ne_kv_len": AttentionCase(_random(4, 64, 160, 32, 0.5, 3), 2, 2, 64, 15, 0.3),
    "single_token_blocks": AttentionCase(_random(2, 20, 24, 1, 0.3, 4), 1, 1, 8, 16, None),
    "one_block_longer_than_sequence_tile": AttentionCase(_random(2, 300, 280, 256, 0.7, 5), 1, 1, 64, 17, None),
    # 64-token blocks are the Triton kernel's key tiles (its full tiles read the lists themselves): a short last
    # block (its one partial tile), and one that is whole
    "blocks_that_are_kernel_tiles": AttentionCase(_random(4, 340, 340, 64, 0.5, 6), 2, 2, 32, 18, None),
    "blocks_that_are_kernel_tiles_no_short": AttentionCase(_random(2, 256, 256, 64, 0.6, 7), 1, 1, 32, 19, None),
    # 64-token blocks with a short one inside: still the kernel's 64-wide tiles, with a partial tile mid-row
    "video_then_text_blocks": AttentionCase(_video_then_text(3 * 64 + 40, 64 + 20, 64, 2, 8), 1, 2, 128, 20, None),
    # scales a kernel must not fold into its running max as if positive (at -20 such a fold overflows exp2)
    "negative_scale": AttentionCase(_random(2, 256, 256, 128, 0.6, 9), 1, 1, 64, 21, -20.0),
    "zero_scale": AttentionCase(_random(2, 256, 256, 64, 0.6, 10), 1, 2, 64, 22, 0.0),
    # SkyReels-V2's diffusion forcing: what a frame-causal plan lists (sparsecore.methods.causal)
    "frame_causal_pasa": AttentionCase(_frame_causal_pasa(), 1, 2, 64, 24, None),
    # no row lists a block: every output 0, every LSE -inf (the kernels still launch their programs)
    "all_rows_empty": AttentionCase(_random(2, 200, 256, 64, 0.0, 11), 2, 1, 64, 23, None),
}


@pytest.mark.parametrize("name", sorted(NAMED_CASES))
def test_named_masks_match_dense_oracle(target, name):
    case = NAMED_CASES[name]
    problems = target.capabilities.mask_problems(case.mask)
    problems += target.capabilities.tensor_problems(target.dtype, case.head_dim, case.mask.num_heads,
                                                    case.num_kv_heads, False)
    if problems:
        pytest.skip(f"{target.backend} cannot take {name}: {'; '.join(problems)}")
    run_and_compare(target, case.mask, *case.inputs(), scale=case.scale)
    run_and_compare(target, case.mask, *case.inputs(), scale=case.scale, device_held=True)
