"""The torch_npu emulator against hand-computed cases, per op, so a wrong emulator cannot hide a wrong lowering.

Most cases use ``q = 0`` (every score 0, so attention is the plain mean of the values it
may see, and the LSE is ``log(count)``) or one or two keys along one axis (scores and
softmax written out by hand). Expected numbers are computed here with ``math``, never
with the emulator's code.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from sparsecore.backends.npu import emulate
from sparsecore.backends.npu.emulator import EMULATOR_FLAG, npu_block_sparse_attention, npu_fusion_attention

D = 64
F16 = torch.float16


def zeros(*shape, dtype=F16):
    return torch.zeros(*shape, dtype=dtype)


def filled(values, shape, dtype=F16):
    """A tensor [..., S, D] whose token s along dim -2 is the constant values[s] (over all of D)."""
    t = torch.tensor(values, dtype=torch.float32).reshape(*([1] * (len(shape) - 2)), -1, 1)
    return t.expand(*shape).to(dtype).contiguous()


def one_hot(scales, heads_shape=(1, 1), dtype=F16):
    """[.., S, D] rows ``scales[s] * e_0``: query/key with a single nonzero coordinate."""
    t = torch.zeros(*heads_shape, len(scales), D)
    t[..., :, 0] = torch.tensor(scales, dtype=torch.float32)
    return t.to(dtype)


def bsa(q, k, v, mask, block_shape, **kwargs):
    kwargs.setdefault("q_input_layout", "BNSD")
    kwargs.setdefault("kv_input_layout", "BNSD")
    kwargs.setdefault("num_key_value_heads", k.shape[1])
    return npu_block_sparse_attention(q, k, v, torch.tensor(mask, dtype=torch.int8), block_shape, **kwargs)


# ----------------------------------------------------------------------------------- npu_block_sparse_attention

@pytest.mark.parametrize("mask, value, count", [([[[[1, 0]]]], 1.0, 128), ([[[[0, 1]]]], 3.0, 128),
                                                ([[[[1, 1]]]], 2.0, 256)])
def test_block_sparse_polarity_one_means_compute(mask, value, count):
    v = filled([1.0] * 128 + [3.0] * 128, (1, 1, 256, D))
    out, lse = bsa(zeros(1, 1, 1, D), zeros(1, 1, 256, D), v, mask, [1, 128], scale_value=0.125, softmax_lse_flag=1)
    assert out.dtype == F16 and out.shape == (1, 1, 1, D)
    assert torch.all(out == value)
    assert lse.dtype == torch.float32 and lse.shape == (1, 1, 1, 1)
    assert lse.item() == pytest.approx(math.log(count), rel=1e-6)


def test_block_sparse_scale_value_defaults_to_zero():
    """scale_value=0.0 by default: every score is 0, so the output is the mean of v whatever q and k are."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 2, D, generator=gen).half() for _ in range(2))
    v = filled([1.0, 2.0, 6.0], (1, 1, 3, D))
    out, lse = npu_block_sparse_attention(q, k[:, :, :1].expand(1, 1, 3, D).contiguous(), v,
                                          torch.ones(1, 1, 1, 1, dtype=torch.int8), [2, 128],
                                          q_input_layout="BNSD", kv_input_layout="BNSD", softmax_lse_flag=1)
    assert torch.all(out == 3.0)
    assert torch.allclose(lse, torch.full_like(lse, math.log(3)))


def test_block_sparse_explicit_scale_hand_softmax():
    # q = 2 e0, keys +e0 and -e0, scale 0.5: scores +1 and -1
    q, k = one_hot([2.0]), one_hot([1.0, -1.0])
    v = filled([1.0, 0.0], (1, 1, 2, D))
    out, lse = bsa(q, k, v, [[[[1]]]], [1, 128], scale_value=0.5, softmax_lse_flag=1, inner_precise=0)
    assert out[0, 0, 0, 0].item() == pytest.approx(math.e / (math.e + 1 / math.e), abs=1e-3)
    assert lse.item() == pytest.approx(math.log(math.e + 1 / math.e), rel=1e-6)


def test_block_sparse_gqa_query_head_n_reads_key_head_n_div_g():
    v = torch.stack([filled([1.0] * 4, (4, D)), filled([2.0] * 4, (4, D))])[None]      # [1, 2, 4, D]
    out, _ = bsa(zeros(1, 4, 1, D), zeros(1, 2, 4, D), v, [[[[1]]] * 4], [1, 128])
    assert out[0, :, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]      # n // 2, not n % 2 (which gives 1, 2, 1, 2)


def test_block_sparse_ceil_grid_with_short_last_blocks():
    # Sq = 3 in query blocks of 2 ({0, 1}, {2}); Skv = 130 in key blocks of 128 ({0..127}, {128, 129})
    v = filled([1.0] * 128 + [5.0, 7.0], (1, 1, 130, D))
    out, lse = bsa(zeros(1, 1, 3, D), zeros(1, 1, 130, D), v, [[[[1, 0], [0, 1]]]], [2, 128], softmax_lse_flag=1)
    assert out[0, 0, :, 0].tolist() == [1.0, 1.0, 6.0]
    assert lse[0, 0, :, 0] == pytest.approx([math.log(128), math.log(128), math.log(2)], rel=1e-6)


def test_block_sparse_rows_without_blocks_and_unrequested_lse_are_undefined():
    out, lse = bsa(zeros(1, 1, 2, D), zeros(1, 1, 4, D), zeros(1, 1, 4, D), [[[[1], [0]]]], [1, 128])
    assert not out[0, 0, 0].isnan().any() and out[0, 0, 1].isnan().all()
    assert lse.shape == (1, 1, 2, 1) and lse.dtype == torch.float32 and lse.isnan().all()   # softmax_lse_flag=0


def test_block_sparse_tnd_layout_with_per_batch_lengths():
    # batch 0: 2 queries, keys with values 1, 3; batch 1: 1 query, keys 10, 20, 30
    v = filled([1.0, 3.0, 10.0, 20.0, 30.0], (1, 5, D))[0][:, None].expand(5, 1, D).contiguous()
    out, lse = npu_block_sparse_attention(zeros(3, 1, D), zeros(5, 1, D), v, torch.ones(2, 1, 1, 1, dtype=torch.int8),
                                          [2, 128], actual_seq_lengths=[2, 1], actual_seq_lengths_kv=[2, 3],
                                          softmax_lse_flag=1, scale_value=1.0)
    assert out.shape == (3, 1, D) and lse.shape == (3, 1, 1)
    assert out[:, 0, 0].tolist() == [2.0, 2.0, 20.0]
    assert lse[:, 0, 0] == pytest.approx([math.log(2), math.log(2), math.log(3)], rel=1e-6)


def _bsa_error_case(change):
    args = {"q": zeros(1, 2, 4, D), "k": zeros(1, 2, 4, D), "v": zeros(1, 2, 4, D),
            "mask": torch.ones(1, 2, 1, 1, dtype=torch.int8), "block_shape": [4, 128],
            "kwargs": {"q_input_layout": "BNSD", "kv_input_layout": "BNSD", "num_key_value_heads": 2}}
    change(args)
    return args


BSA_ERRORS = {
    "float32 inputs": (lambda a: a.update(q=a["q"].float(), k=a["k"].float(), v=a["v"].float()), "float16 or bfloat16"),
    "mixed dtypes": (lambda a: a.update(k=a["k"].bfloat16()), "one dtype"),
    "head dim 32": (lambda a: a.update(q=zeros(1, 2, 4, 32), k=zeros(1, 2, 4, 32), v=zeros(1, 2, 4, 32)), "64 or 128"),
    "block_shape[1] = 64": (lambda a: a.update(block_shape=[4, 64]), "multiple of 128"),
    "block_shape with 0": (lambda a: a.update(block_shape=[0, 128]), "both > 0"),
    "block_shape of 3": (lambda a: a.update(block_shape=[4, 128, 7]), "both > 0"),   # the op's tiling: exactly 2
    "layouts differ": (lambda a: a["kwargs"].update(kv_input_layout="TND"), "must equal q_input_layout"),
    "BSND layout": (lambda a: a["kwargs"].update(q_input_layout="BSND", kv_input_layout="BSND"), "TND or BNSD"),
    "bf16 with inner_precise=1": (lambda a: a.update(q=a["q"].bfloat16(), k=a["k"].bfloat16(), v=a["v"].bfloat16()),
                                  "only inner_precise=0"),
    "inner_precise=4 (950 only)": (lambda a: a["kwargs"].update(inner_precise=4), "0 or 1 on Atlas A2/A3"),
    "bool mask": (lambda a: a.update(mask=a["mask"].bool()), "must be int8"),
    "mask shape": (lambda a: a.update(mask=torch.ones(1, 2, 1, 2, dtype=torch.int8)), "ceil"),
    "num_key_value_heads mismatch": (lambda a: a["kwargs"].update(num_key_value_heads=1), "must equal the key's"),
    "N1 % N2 != 0": (lambda a: a.update(q=zeros(1, 3, 4, D), mask=torch.ones(1, 3, 1, 1, dtype=torch.int8)),
                     "N1 % N2 == 0"),
    "G = 3": (lambda a: (a.update(q=zeros(1, 3, 4, D), k=zeros(1, 1, 4, D), v=zeros(1, 1, 4, D),
                                  mask=torch.ones(1, 3, 1, 1, dtype=torch.int8)),
                         a["kwargs"].update(num_key_value_heads=1)), "128 % G == 0"),
    "one actual length": (lambda a: a["kwargs"].update(actual_seq_lengths=[4]), "together"),
    "TND without lengths": (lambda a: a["kwargs"].update(q_input_layout="TND", kv_input_layout="TND"),
                            "needs actual_seq_lengths"),
    "TND lengths short of T": (lambda a: (a.update(q=zeros(5, 2, D), k=zeros(5, 2, D), v=zeros(5, 2, D),
                                                   mask=torch.ones(1, 2, 1, 1, dtype=torch.int8)),
                                          a["kwargs"].update(q_input_layout="TND", kv_input_layout="TND",
                                                             actual_seq_lengths=[3], actual_seq_lengths_kv=[5])),
                               "add up to T"),
    "softmax_lse_flag=2": (lambda a: a["kwargs"].update(softmax_lse_flag=2), "0 or 1"),
    # aclnnBlockSparseAttention lists query, key, value and the mask as non-contiguous: unsupported
    "non-contiguous query": (lambda a: a.update(q=zeros(1, 4, 2, D).transpose(1, 2)), "query must be contiguous"),
    "non-contiguous value": (lambda a: a.update(v=zeros(1, 4, 2, D).transpose(1, 2)), "value must be contiguous"),
    "non-contiguous mask": (lambda a: a.update(mask=torch.ones(1, 1, 1, 1, dtype=torch.int8).expand(1, 2, 1, 1)),
                            "block_sparse_mask must be contiguous"),
}


@pytest.mark.parametrize("name", sorted(BSA_ERRORS))
def test_block_sparse_constraints_raise_like_the_op(name):
    change, message = BSA_ERRORS[name]
    a = _bsa_error_case(change)
    with pytest.raises(RuntimeError, match=message):
        npu_block_sparse_attention(a["q"], a["k"], a["v"], a["mask"], a["block_shape"], **a["kwargs"])


# ----------------------------------------------------------------------------------------- npu_fusion_attention

def fa(q, k, v, **kwargs):
    return npu_fusion_attention(q, k, v, q.shape[1], "BNSD", **kwargs)


def test_fusion_scale_defaults_to_one_and_returns_seven_items():
    # q = e0, keys e0 and 0: scores (1, 0) * scale
    q, k = one_hot([1.0]), one_hot([1.0, 0.0])
    v = filled([1.0, 0.0], (1, 1, 2, D), dtype=torch.float32)
    result = fa(q.float(), k.float(), v)
    assert len(result) == 7
    out, softmax_max, softmax_sum, reserved, seed, offset, mask_len = result
    assert out[0, 0, 0, 0].item() == pytest.approx(math.e / (math.e + 1), rel=1e-6)          # scale 1.0
    assert softmax_max.shape == softmax_sum.shape == (1, 1, 1, 8)
    assert softmax_max.dtype == softmax_sum.dtype == torch.float32
    assert torch.all(softmax_max == 1.0)
    assert softmax_sum[0, 0, 0].tolist() == pytest.approx([1 + math.exp(-1)] * 8, rel=1e-6)
    assert (reserved.numel(), seed, offset, mask_len) == (0, 0, 0, 0)
    scaled = fa(q.float(), k.float(), v, scale=0.5)
    assert scaled[0][0, 0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(-0.5)), rel=1e-6)
    assert torch.all(scaled[1] == 0.5)


def test_fusion_lse_is_max_plus_log_sum():
    q, k = one_hot([3.0]), one_hot([1.0, 2.0, -1.0])
    _, softmax_max, softmax_sum, *_ = fa(q, k, zeros(1, 1, 3, D), scale=0.25)
    scores = [0.75, 1.5, -0.75]
    assert softmax_max[0, 0, 0, 0].item() == pytest.approx(1.5)
    lse = softmax_max[0, 0, 0, 0].item() + math.log(softmax_sum[0, 0, 0, 0].item())
    assert lse == pytest.approx(math.log(sum(math.exp(s) for s in scores)), rel=1e-6)


def test_fusion_polarity_true_means_masked_out():
    v = filled([1.0, 5.0], (1, 1, 2, D))
    out, softmax_max, softmax_sum, *_ = fa(zeros(1, 1, 1, D), zeros(1, 1, 2, D), v,
                                           atten_mask=torch.tensor([[False, True]]))
    assert torch.all(out == 1.0)
    assert softmax_max[0, 0, 0, 0].item() == 0.0 and softmax_sum[0, 0, 0, 0].item() == 1.0


def test_fusion_gqa_query_head_n_reads_key_head_n_div_g():
    v = torch.stack([filled([1.0], (1, D)), filled([2.0], (1, D)), filled([3.0], (1, D))])[None]   # [1, 3, 1, D]
    out, *_ = fa(zeros(1, 6, 1, D), zeros(1, 3, 1, D), v)
    assert out[0, :, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("shape", ["SS", "11SS", "B1SS", "BNSS"])
def test_fusion_mask_shapes_broadcast(shape):
    base = torch.tensor([[False, True, True], [True, False, True]])          # row i sees key i
    mask = {"SS": base, "11SS": base[None, None], "B1SS": base[None, None].expand(2, 1, 2, 3),
            "BNSS": base[None, None].expand(2, 2, 2, 3)}[shape].to(torch.uint8 if shape == "BNSS" else torch.bool)
    v = filled([1.0, 2.0, 3.0], (2, 2, 3, D))
    out, *_ = fa(zeros(2, 2, 2, D), zeros(2, 2, 3, D), v, atten_mask=mask)
    assert torch.all(out[..., 0, :] == 1.0) and torch.all(out[..., 1, :] == 2.0)


def test_fusion_sparse_mode_0_applies_the_band_with_the_mask():
    v = filled([1.0, 2.0, 3.0], (1, 1, 3, D))
    off_diagonal = ~torch.eye(3, dtype=torch.bool)                           # the band pre = next = 0, as a mask
    out, *_ = fa(zeros(1, 1, 3, D), zeros(1, 1, 3, D), v, atten_mask=off_diagonal, pre_tockens=0, next_tockens=0)
    assert out[0, 0, :, 0].tolist() == [1.0, 2.0, 3.0]                       # diagonal only
    full, *_ = fa(zeros(1, 1, 3, D), zeros(1, 1, 3, D), v, atten_mask=torch.zeros(3, 3, dtype=torch.bool),
                  pre_tockens=0, next_tockens=0, sparse_mode=1)
    assert torch.all(full == 2.0)                                           # mode 1 ignores pre/next


def test_fusion_sparse_mode_0_refuses_a_mask_that_keeps_positions_outside_the_band():
    """The doc: with sparse_mode 0 the atten_mask must agree with pre_tockens/next_tockens, else the result is wrong;
    a lowering that left a position to the band alone would match here and be wrong on the device."""
    with pytest.raises(RuntimeError, match=r"sparse_mode=0.*outside the pre_tockens/next_tockens band"):
        fa(zeros(1, 1, 3, D), zeros(1, 1, 3, D), zeros(1, 1, 3, D), atten_mask=torch.zeros(3, 3, dtype=torch.bool),
           pre_tockens=0, next_tockens=0)


@pytest.mark.parametrize("inner_precise", [0, 2])
def test_fusion_fully_masked_rows_are_undefined_in_every_mode(inner_precise):
    """The doc says ``inner_precise=2`` computes "invalid rows" without precision loss, not what it writes there."""
    mask = torch.tensor([[False, False], [True, True]])
    v = filled([1.0, 3.0], (1, 1, 2, D))
    out, softmax_max, softmax_sum, *_ = fa(zeros(1, 1, 2, D), zeros(1, 1, 2, D), v, atten_mask=mask,
                                           inner_precise=inner_precise)
    assert torch.all(out[0, 0, 0] == 2.0) and out[0, 0, 1].isnan().all()
    assert softmax_max[0, 0, 1].isnan().all() and softmax_sum[0, 0, 1].isnan().all()


def test_fusion_rows_scoring_a_non_finite_key_are_undefined_unless_it_is_masked_out():
    """The doc says nothing of a score of +-inf or NaN: a row that computes one (row 0 here) is NaN, so a caller
    relying on the device giving a -inf score weight 0 fails here; a masked-out one (row 1) is selected away."""
    k = zeros(1, 1, 2, D)
    k[0, 0, 0, 0] = -math.inf
    mask = torch.tensor([[False, False], [True, False]])
    out, softmax_max, softmax_sum, *_ = fa(filled([1.0, 1.0], (1, 1, 2, D)), k, filled([1.0, 3.0], (1, 1, 2, D)),
                                           atten_mask=mask)
    assert out[0, 0, 0].isnan().all() and softmax_max[0, 0, 0].isnan().all() and softmax_sum[0, 0, 0].isnan().all()
    assert torch.all(out[0, 0, 1] == 3.0)


def test_block_mask_values_other_than_0_or_1_are_refused():
    """The CPU golden computes where a value is not 0, the A2 kernel where it is at least 1: -1 or 2 would
    pass here and mean something else on the device."""
    q = torch.randn(1, 1, 4, 64, generator=torch.Generator().manual_seed(0)).half()
    for value in (-1, 2):
        with pytest.raises(RuntimeError, match=r"0 \(skip\) or 1 \(compute\).*got values \[" + str(value)):
            bsa(q, q, q, [[[[value]]]], [4, 128], scale_value=0.5, inner_precise=0)


def test_fusion_bsnd_and_bsh_layouts_match_bnsd():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 5, D, generator=gen) for _ in range(3))
    reference = fa(q, k, v, scale=0.3)[0]
    bsnd = npu_fusion_attention(*(t.transpose(1, 2) for t in (q, k, v)), 4, "BSND", scale=0.3)[0]
    bsh = npu_fusion_attention(*(t.transpose(1, 2).reshape(2, 5, 4 * D) for t in (q, k, v)), 4, "BSH", scale=0.3)[0]
    assert torch.equal(bsnd.transpose(1, 2), reference)
    assert torch.equal(bsh.reshape(2, 5, 4, D).transpose(1, 2), reference)


FA_ERRORS = {
    "head_num mismatch": (lambda q, k, v: npu_fusion_attention(q, k, v, 3, "BNSD"), "head_num"),
    "Nq % Nkv": (lambda q, k, v: fa(q, k[:, :3], v[:, :3]), "multiple of Nkv"),
    "float64": (lambda q, k, v: fa(q.double(), k.double(), v.double()), "float16, bfloat16 or float32"),
    "layout": (lambda q, k, v: npu_fusion_attention(q, k, v, 4, "NSD"), "input_layout"),
    "k, v shapes": (lambda q, k, v: fa(q, k, v[:, :, :2]), "same shape"),
    "mask dtype": (lambda q, k, v: fa(q, k, v, atten_mask=torch.zeros(3, 3)), "bool or uint8"),
    "mask shape 1NSS with B=2": (lambda q, k, v: fa(q, k, v, atten_mask=torch.zeros(1, 4, 3, 3, dtype=torch.bool)),
                                 "BNSS, B1SS, 11SS or SS"),
    "padding_mask": (lambda q, k, v: fa(q, k, v, padding_mask=torch.zeros(1)), "padding_mask"),
    "head dim 769": (lambda q, k, v: fa(zeros(2, 4, 3, 769), zeros(2, 4, 3, 769), zeros(2, 4, 3, 769)), "1..768"),
    "inner_precise 3": (lambda q, k, v: fa(q, k, v, inner_precise=3), "inner_precise"),
}


@pytest.mark.parametrize("name", sorted(FA_ERRORS))
def test_fusion_constraints_raise_like_the_op(name):
    call, message = FA_ERRORS[name]
    q, k, v = zeros(2, 4, 3, D), zeros(2, 4, 3, D), zeros(2, 4, 3, D)
    with pytest.raises(RuntimeError, match=message):
        call(q, k, v)


@pytest.mark.parametrize("kwargs", [{"keep_prob": 0.9}, {"pse": torch.zeros(1)},
                                    {"sparse_mode": 3, "atten_mask": torch.ones(3, 3).bool()}])
def test_fusion_features_outside_the_emulator_say_so(kwargs):
    with pytest.raises(NotImplementedError, match="emulator"):
        fa(zeros(1, 1, 3, D), zeros(1, 1, 3, D), zeros(1, 1, 3, D), **kwargs)


# ------------------------------------------------------------------------------------------------- emulate()

def test_emulate_installs_and_removes_the_module(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    context = emulate()
    assert "torch_npu" not in sys.modules                  # nothing happens before the block is entered
    with context as module:
        assert sys.modules["torch_npu"] is module and getattr(module, EMULATOR_FLAG) is True
        assert module.npu_fusion_attention is npu_fusion_attention
        with emulate() as inner:
            assert sys.modules["torch_npu"] is inner
        assert sys.modules["torch_npu"] is module
    assert "torch_npu" not in sys.modules


def test_emulate_restores_what_was_there_even_after_an_error(monkeypatch):
    previous = object()
    monkeypatch.setitem(sys.modules, "torch_npu", previous)
    with pytest.raises(KeyError):
        with emulate():
            raise KeyError("boom")
    assert sys.modules["torch_npu"] is previous


@pytest.mark.parametrize("side", ["query", "key"])
def test_fusion_refuses_a_sequence_past_the_documented_1m(side):
    """The doc: "S: sequence length, 1~1M" (read as 2**20). Checked on the shapes before anything is computed, so a
    stride-0 view of 2**20 + 1 tokens costs nothing."""
    import sparsecore.backends.npu.emulator as emulator
    long = zeros(1, 1, 1, D).expand(1, 1, emulator.FUSION_MAX_SEQ + 1, D)
    short = zeros(1, 1, 4, D)
    q, kv = (long, short) if side == "query" else (short, long)
    with pytest.raises(RuntimeError, match=r"sequence lengths must be 1\.\.1048576 .*got Sq=.*Skv="):
        fa(q, kv, kv)
