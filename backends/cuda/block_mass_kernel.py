"""Triton kernel for AdaSpa's block attention mass (arXiv 2502.21079, Sec. 4.2, Alg. 1-2).

One program per (query tile, head, batch) loads its queries and row LSEs once, then
walks the key tiles its query block may see (all, or under frame-causal attention the tiles
of a prefix of the key blocks) and adds ``sum exp(scale * q.k - lse)`` over each tile into
``mass[b, h, query block, key block]`` with one atomic add: the scores are never written to
memory. Key tiles are cut at key-block boundaries, so each tile belongs to one block; query
tiles never straddle two query blocks. Rows past the
block end, and rows whose LSE is infinite (no key under a cached LSE), add nothing; a NaN
LSE gives NaN masses (non-finite activations), which AdaSpa's search refuses.
"""

import triton
import triton.language as tl


@triton.jit
def _query_rows(Q, Lse, b, head, offs_m, row_ok, offs_d, stride_qb, stride_qh, stride_qm, stride_lb, stride_lh):
    """A tile's queries and their LSE in log2 units, +inf where missing or infinite (such rows add nothing); a NaN
    LSE stays NaN, so its row's masses are NaN and the planner's finite check refuses them."""
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + offs_m, mask=row_ok,
                  other=float("inf"))
    return q, tl.where((lse == float("-inf")) | (lse == float("inf")), float("inf"), lse * 1.4426950408889634)


@triton.jit
def block_mass_fwd(Q, K, Lse, Mass, Programs, TileStart, TileEnd, TileBlock,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_lb, stride_lh, stride_mb, stride_mh, stride_mi,
                   qk_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """``Programs``: per query tile (start, end, block, key tiles it walks: the first that many)."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(Programs + pid * 4)
    q_end = tl.load(Programs + pid * 4 + 1)
    q_block = tl.load(Programs + pid * 4 + 2)
    num_tiles = tl.load(Programs + pid * 4 + 3)
    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_end
    q, lse = _query_rows(Q, Lse, b, head, offs_m, row_ok, offs_d, stride_qb, stride_qh, stride_qm, stride_lb,
                         stride_lh)
    k_ptrs = K + b.to(tl.int64) * stride_kb + (head // GROUP).to(tl.int64) * stride_kh \
        + offs_n[None, :] * stride_kn + offs_d[:, None]
    mass_row = Mass + b.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh + q_block.to(tl.int64) * stride_mi
    for t in range(0, num_tiles):
        start = tl.load(TileStart + t)
        col_ok = start + offs_n < tl.load(TileEnd + t)
        k = tl.load(k_ptrs + start * stride_kn, mask=col_ok[None, :], other=0.0)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale - lse[:, None]
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.math.exp2(scores), 0.0)   # a padded row's 0 x inf: NaN
        tl.atomic_add(mass_row + tl.load(TileBlock + t), tl.sum(p))      # one reduction: sm100 (see below)


@triton.jit
def block_mass_segmented_fwd(Q, K, Lse, Mass, desc_k, QOffsets, Walked, SegStart, SegBlock,
                             stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                             stride_lb, stride_lh, stride_mb, stride_mh, stride_mi,
                             num_kv_heads, kv_len, qk_scale,
                             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                             USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, ONE_SEGMENT: tl.constexpr):
    """The same masses where the key blocks run in segments of 64-token blocks, each segment's last block 1 to 64
    tokens (AdaSpa's 64-token blocks: one segment; cut at frame-causal block edges: one a causal block), and every
    query block holds at most 64 tokens.

    One program per query block (``QOffsets``: the query block offsets); it walks the first ``Walked[block]``
    key segments (``SegStart``: their token offsets, ``SegBlock``: their first blocks, each with its end after
    it); the masses of the others stay as allocated (0). Key tiles of ``BLOCK_N`` (64 or 128) keys start at
    multiples of ``BLOCK_N`` from their segment's start, so a tile's blocks are known without tile tables and a
    full tile needs no mask. Each program writes its own row of masses: plain stores; a 128-key tile sums each of
    its two blocks apart (a block of tiny mass beside a large one keeps its own float32 precision). A segment's
    keys past its last full tile run as one masked tile. ``ONE_SEGMENT``: every program walks
    the one segment (the segment loop folds away, as in the one-segment kernel measured before segments).
    """
    q_block = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    kv_head = head // GROUP
    offs_m = tl.load(QOffsets + q_block) + tl.arange(0, 64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < tl.load(QOffsets + q_block + 1)
    q, lse = _query_rows(Q, Lse, b, head, offs_m, row_ok, offs_d, stride_qb, stride_qh, stride_qm, stride_lb,
                         stride_lh)
    k_ptrs = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn \
        + offs_d[:, None]
    kv_row0 = (b * num_kv_heads + kv_head) * kv_len if USE_TMA else 0
    mass_row = Mass + b.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh + q_block.to(tl.int64) * stride_mi
    walked = 1 if ONE_SEGMENT else tl.load(Walked + q_block)
    for segment in range(0, walked):
        seg_start = tl.load(SegStart + segment)
        seg_end = tl.load(SegStart + segment + 1)
        first_block = tl.load(SegBlock + segment)
        num_full = (seg_end - seg_start) // BLOCK_N
        for t in range(0, num_full):
            start = seg_start + t * BLOCK_N
            if USE_TMA:
                k = desc_k.load([kv_row0 + start, 0]).T
            else:
                k = tl.load(k_ptrs + start * stride_kn)
            p = tl.math.exp2(tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
            # Row sums keep their [64, 1] shape: Triton 3.6 fails to compile a rank-1 sum of a dot's row sums for
            # sm100 (OptimizeTMemLayouts: "parent layout must have at least rank >= 2").
            for piece in tl.static_range(BLOCK_N // 64):     # each block's own sum (not the tile's less the first's)
                inside = (offs_n[None, :] >= piece * 64) & (offs_n[None, :] < piece * 64 + 64) & row_ok[:, None]
                tl.store(mass_row + first_block + t * (BLOCK_N // 64) + piece,
                         tl.sum(tl.sum(tl.where(inside, p, 0.0), 1, keep_dims=True)))
        start = seg_start + num_full * BLOCK_N
        if start < seg_end:
            col_ok = start + offs_n < seg_end
            k = tl.load(k_ptrs + start * stride_kn, mask=col_ok[None, :], other=0.0)
            p = tl.where(row_ok[:, None] & col_ok[None, :], tl.math.exp2(tl.dot(q, k, input_precision=DOT_PRECISION)
                                                                           * qk_scale - lse[:, None]), 0.0)
            end_block = tl.load(SegBlock + segment + 1)
            for piece in tl.static_range(BLOCK_N // 64):
                inside = (offs_n[None, :] >= piece * 64) & (offs_n[None, :] < piece * 64 + 64)
                block = first_block + num_full * (BLOCK_N // 64) + piece
                tl.store(mass_row + block, tl.sum(tl.where(inside, p, 0.0)), mask=block < end_block)
