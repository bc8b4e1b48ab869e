"""The ``fa4`` lowering: any BlockMask through FlashAttention-4's block sparsity (CuTe DSL).

FA4's forward runs a list of full key tiles and a list of mask key tiles per (head,
query tile); :mod:`.fa4_layout` converts the IR to those lists exactly (tiles that
blocks cover whole are full; the rest are mask tiles decided by a lookup ``mask_mod``
over the IR's bit-packed block map). Masks aligned with the tiles (uniform 128 blocks,
64-token blocks on 64 tiles) run with full tiles only and no mask_mod, the path measured
at 603-641 eff TFLOP/s on an H200 (shared/ANCHORS.md).

API facts relied on (read in the flash-attn-4 4.0.0b36 wheel from PyPI, files under
``flash_attn/cute/``: interface.py, block_sparsity.py, block_sparse_utils.py, flash_fwd_sm90.py,
mask.py, softmax.py, cute_dsl_utils.py, utils.py; mask_mod examples from FA4's tests, which the
wheel does not ship, at Dao-AILab/flash-attention tag fa4-v4.0.0.beta27, commit 0251105a,
tests/cute/mask_mod_definitions.py and test_mask_mod.py):

- ``interface.flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None,
  causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1,
  pack_gqa=None, deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None,
  aux_tensors=None, aux_scalars=None, block_sparse_tensors=None, block_sparse_tensors_bwd=None,
  return_lse=False, ...) -> (out, lse)``. The 4th positional parameter is ``qv``: we pass
  everything after k, v by keyword.
- Layout ``q [B, Sq, H, D]``, ``k, v [B, Sk, Hkv, D]``, fp16/bf16, ``H % Hkv == 0`` (query head
  h reads key head ``h // (H / Hkv)``); a tensor with unit last stride and 16-byte aligned
  other strides is used as is (``cute_dsl_utils.maybe_contiguous``), so our ``[B, H, S, D]``
  tensors go in as transposed views without a copy. ``out [B, Sq, H, D]`` in q's dtype; ``lse``
  float32 ``[B, H, Sq]``, natural log (``softmax.finalize``: ``(max * scale * log2 e + log2 sum) *
  ln 2``), None unless ``return_lse`` (or autograd needs it). ``softmax_scale`` defaults to 1/sqrt(D).
- ``interface._flash_attn_fwd(q, k, v, ..., num_threads=384, ...) -> (out, lse, p, row_max, o_lo)``: the
  private forward ``flash_attn_func`` calls (without its autograd wrapper); :mod:`.fa4_occupancy` calls it
  with the same keywords and its own ``num_threads``, part of the compile key and unused on SM90.
- ``block_sparsity.BlockSparseTensorsTorch(mask_block_cnt [B, H, M], mask_block_idx [B, H, M, N],
  full_block_cnt, full_block_idx, ..., block_size=(q, kv))``: int32 on CUDA; B and H may be 1
  (expanded); ``M = ceil(Sq / q)``; ``N <= ceil(Sk / kv)`` (compact lists: only the first ``cnt``
  entries are read). A per-head H turns pack_gqa off (``_flash_attn_fwd``); we pass
  ``pack_gqa=False``, so mask_mod's ``head`` is the query head.
- SM90 tiles (``_tile_size_fwd_sm90``, ``_fit_sm90_fwd_tile_to_block_sparsity``): at head dim
  <= 128, ``block_size`` in {64, 128} x {64, 128} gives exactly that tile; the sparse key block
  must equal ``tile_n`` ("Block sparsity requires sparse_block_size[1]=... to match tile_n"), the
  query block be a multiple of ``tile_m``. Head dims 8..256 (multiple of 8) compile on SM90; at
  192/256 tile_n is 112/80, which a 64/128 key block does not match, so we take 64, 96, 128.
  SM100 tiles differently (128 x 128 with ``q_stage = 2``, query blocks a multiple of 256, which FA4
  lowers to one stage for short sequences): never run here, so this lowering declares 9.x only.
- ``block_sparse_utils.consume_block_sparse_loads`` walks each list from its last entry and
  applies sequence-length masking only to the first tile it takes: lists must be ascending
  so the short last key tile is taken first. Full tiles skip mask_mod. Mask tiles call
  ``mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors)`` per element (scalar
  TensorSSA indices on SM90, ``mask.py``) and keep the pair where it returns True; the
  indices may point past the sequence in padded tile positions, so the aux tensors are
  padded to whole tiles. ``aux_tensors`` is a list of torch tensors indexed inside mask_mod
  (``__leading_dim__`` marks the unit-stride dim, as FA4's tests do); the uint32 bit test
  follows FA4's own ``cute_packed_mask_aux`` (``utils.shr_u32``).
- A query tile with empty lists gets output 0 and LSE -inf (``softmax.reset(); acc_O.fill(0)``
  in ``flash_fwd_sm90``), a row masked out everywhere gets row sum 0, hence LSE -inf and
  output 0 (``softmax.finalize``). That is code, not documentation: rows whose IR list is
  empty are set to 0 / -inf here as well.
- Kernels compile per (dtype, head dim, tile, mask_mod source hash, aux dtypes, broadcast
  pattern, ...) (``compile_key``), not per shape or mask: on the H200 host the compile took 4.1 s without a
  mask_mod and 6.2-7.4 s with ours, after 8.4-9.6 s importing ``flash_attn.cute`` in a fresh process
  (``bench/first_call_probe.py``, 2026-12-01); a new mask of a compiled shape compiles nothing.

The run function (:class:`.fa4_launch.Fa4Launch`) converts the mask once per device and key-range count
(kept on the GPU, or in host memory and copied per call) and calls FA4; for
masks that approximate unlisted blocks (PASA) it merges Triton's approximation pass into FA4's exact
output, so those take head dims 64 and 128 (the pass's tiles are powers of two).

On SM90, 64 x 64 tiles run at two CTAs per SM (:mod:`.fa4_occupancy`; ``ctas_per_sm=1`` keeps
FA4's own launch), in key ranges where a head's keys and values outgrow the L2 (``key_parts``).
The backend also offers FA4's dense forward as sparsecore's dense attention (:mod:`.fa4_dense`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass

import torch

from sparsecore.capabilities import Capabilities
from sparsecore.ir import BlockMask
from sparsecore.ir.unselected import KINDS
from sparsecore.ir.validation import check_bool
from sparsecore.registry import Backend, DenseOp, Run, UnsupportedError

from . import fa4_dense, shared_memory
from .fa4_launch import MAX_KEY_PARTS, Fa4Launch
from .fa4_layout import choose_tile_side

SM90_SIDES = (64, 128)


@dataclass(frozen=True)
class Fa4Options:
    """Tile overrides (None: chosen from the mask's blocks, :func:`.fa4_layout.choose_tile_side`) and occupancy.

    ``tile_m``: query tile (= FA4's sparse query block), ``tile_n``: key tile (= sparse key
    block). SM90 takes 64 or 128 for each. ``ctas_per_sm``: on
    SM90, 64 x 64 tiles (one MMA warpgroup) run two CTAs per SM (2, :mod:`.fa4_occupancy`) or as FA4
    launches them (1); other tiles are unaffected. ``key_parts``: run the mask as this many launches over
    consecutive key-tile ranges (:mod:`.fa4_key_ranges`), each merged into the first by LSE
    (:mod:`.lse_merge`), so the keys and values one launch reads at a time fit the L2 better; 1: one
    launch; None (the default, auto): on the two-CTA 64 x 64 SM90 kernel, the case measured, chosen at
    call time by :func:`.fa4_launch.auto_key_parts` from one KV head's keys plus values and the device's L2; one
    launch elsewhere. Measured on an H200 (2026-12-01,
    bench/results/gpu-2026-12-01-runs/sixth-session/key-split-probe.md), AdaSpa-shaped mask, 188,736
    tokens, 64-token blocks, bf16, 12 heads, head dim 128, two CTAs per SM: 1 part 100.4-110.3 ms, 2 parts
    90.07, 4 parts 85.95, 8 parts 92.02 (Triton 99.7). There a head's K+V is 96.6 MB, about twice the
    50 MiB L2; at 32K and 98K tokens (16 / 50.3 MB, within the L2) the unsplit kernel runs at 530-543 eff
    TFLOP/s. A split costs one partial output (``q``'s size) while it runs (peak above the inputs 553 ->
    1124 MiB there), the ranges' lists beside the whole mask's in the plan (about as large again), and rounds
    the output once more per extra part (bf16: about 2e-3 relative each).
    ``reorder_keys``: where key blocks span tiles off the tile grid (LVSA's frames), FA4 reads the keys and
    values gathered in :func:`.fa4_key_order.key_order` (a copy of each per call), where that makes fewer key
    tiles mask tiles by enough (:func:`.fa4_layout.tile_cost`); False keeps their order.
    """

    tile_m: int | None = None
    tile_n: int | None = None
    ctas_per_sm: int = 2
    key_parts: int | None = None
    reorder_keys: bool = True

    def __post_init__(self) -> None:
        for name in ("tile_m", "tile_n"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 16
                                      or value % 16):
                raise ValueError(f"{name}: expected None or a multiple of 16 (a kernel tile side), got {value!r}")
        if type(self.ctas_per_sm) is not int or self.ctas_per_sm not in (1, 2):
            raise ValueError(f"ctas_per_sm: expected the int 1 (FA4's own launch) or 2 (two CTAs per SM for 64 x 64 "
                             f"tiles on SM90, .fa4_occupancy), got {self.ctas_per_sm!r}")
        check_bool(self.reorder_keys, "reorder_keys")
        if self.key_parts is not None and (type(self.key_parts) is not int
                                           or not 1 <= self.key_parts <= MAX_KEY_PARTS):
            raise ValueError(f"key_parts: expected None (auto: chosen per call from the L2, "
                             f"fa4_launch.auto_key_parts) or an "
                             f"int from 1 (one launch) to {MAX_KEY_PARTS}, got {self.key_parts!r}")


class Fa4Backend(Backend):
    name = "fa4"
    install_hint = "pip install flash-attn-4==4.0.0b36 (CuTe DSL kernels, JIT-compiled on first use; SM90)"
    options_type = Fa4Options
    slow_to_load = True        # unavailable_reason() imports flash_attn.cute: 8-12 s on the H200 host (tenth session)
    lowers_from_host = False   # to_fa4 reads the lists with torch on the run device (or numpy, copied there)
    host_plans = True          # Fa4Launch.keep_plans_on_host; to_fa4 takes host lists (one transient upload)
    dense = DenseOp(run=fa4_dense.run, supports=fa4_dense.supports)     # FA4's dense forward, where measured faster
    capabilities = Capabilities(devices=("cuda",), array_type="torch", dtypes=frozenset({"float16", "bfloat16"}),
                                head_dims=frozenset({64, 96, 128}), unselected=frozenset(KINDS),
                                unselected_head_dims=frozenset({64, 128}),   # Triton's approximation pass
                                unselected_shared_memory=shared_memory.APPROXIMATION_SHARED_MEMORY,   # (fits SM90)
                                infinite_values_exact=False)     # plans with mask tiles: .fa4_nonfinite.poison

    def unavailable_reason(self, device: str) -> str | None:
        reason = self.unavailable_before_loading(device)
        if reason is not None:
            return reason
        error = _import_error()
        if error is not None:
            return f"flash_attn.cute is not importable: {error}"
        return None

    def unavailable_before_loading(self, device: str) -> str | None:
        """Installed, a CUDA device of compute capability 9.x: what is seen without importing FA4."""
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn-4 is not installed (no module flash_attn)"
        if not torch.cuda.is_available():
            return f"torch.cuda.is_available() is False in torch {torch.__version__}"
        try:
            major, minor = torch.cuda.get_device_capability(torch.device(device))
        except (RuntimeError, AssertionError, ValueError) as exc:
            return f"cannot query device {device!r}: {exc}"
        if major != 9:
            return (f"compute capability {major}.{minor}: this lowering uses FA4's block-sparse forward on 9.x "
                    f"(Hopper) only; Blackwell's tiles differ and were never run here (the triton lowering runs there)")
        return None

    def shared_memory(self, device: str) -> int | None:
        return shared_memory.device_shared_memory(device)

    def preference(self, mask: BlockMask) -> int:
        from .selection import preference
        return preference(self.name, mask)

    def warmup_options(self, mask: BlockMask, options: Fa4Options, call: tuple) -> Fa4Options:
        """The tiles the whole mask takes (chosen from all its blocks) and the key ranges the call runs as (from the
        keys' length; several ranges ask FA4 for the LSE they merge by), fixed for the call's sample. Converts
        nothing."""
        q, k, v, _, _ = call
        run = self.lower(mask, str(q.device), options)
        return dataclasses.replace(options, tile_m=run.tile_m, tile_n=run.tile_n, key_parts=run.key_parts_for(k, v))

    def lower(self, mask: BlockMask, device: str, options: Fa4Options) -> Run:
        tile_m, tile_n = tile_shape(mask, options)
        return Fa4Launch(mask, tile_m, tile_n, two_per_sm=two_ctas_per_sm(tile_m, tile_n, options),
                         key_parts=options.key_parts, reorder_keys=options.reorder_keys)


def two_ctas_per_sm(tile_m: int, tile_n: int, options: Fa4Options) -> bool:
    """Whether the kernel runs two CTAs per SM (:mod:`.fa4_occupancy`): SM90, 64 x 64 tiles (one MMA warpgroup, ~90 KB
    of shared memory: the case measured; 64 x 128 needs ~144 KB, so one CTA), the tested flash-attn-4, and not
    ``ctas_per_sm=1``."""
    from .fa4_occupancy import supported
    return (tile_m, tile_n) == (64, 64) and options.ctas_per_sm == 2 and supported()


def tile_shape(mask: BlockMask, options: Fa4Options) -> tuple[int, int]:
    """(tile_m, tile_n) on SM90: the options', else chosen per side from the blocks."""
    for name, value in (("tile_m", options.tile_m), ("tile_n", options.tile_n)):
        if value is not None and value not in SM90_SIDES:
            raise UnsupportedError(f"{name}: FA4's block-sparse forward on SM90 takes tiles of {list(SM90_SIDES)} "
                                   f"(the sparse key block must equal the kernel's key tile), got {value}; "
                                   f"leave it None to choose from the mask")
    tile_m = options.tile_m or choose_tile_side(mask.q_offsets, SM90_SIDES)
    tile_n = options.tile_n or choose_tile_side(mask.kv_offsets, SM90_SIDES)
    return tile_m, tile_n


@functools.lru_cache(maxsize=None)
def _import_error() -> str | None:
    """Why ``flash_attn.cute`` cannot be imported here (None: it can). Imported once per process."""
    try:
        import flash_attn.cute  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (any failure of the CuTe DSL stack makes the backend unavailable)
        return f"{type(exc).__name__}: {exc}"
    return None
